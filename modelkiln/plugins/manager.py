"""The plugin manager factory, and what the loaded plugins contribute.

No manager is built at import time: ``load_plugins`` builds a fresh one (tests get their
own from a fixture). Built-in plugins are listed in this package's ``modelkiln``
entry-point group and loaded by the same loop as third-party ones, through pluggy's own
``load_setuptools_entrypoints``, one entry point at a time, so that one plugin that fails
to import is reported by name while the others load.

Every hook is called through ``call_each``: one implementation at a time, each inside
its own try/except, so a broken plugin is logged by name and the daemon goes on. That is
why hook wrappers (``wrapper=True``) are refused when a plugin registers: they wrap the
whole call, which this isolation never makes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import pluggy

from ..errors import ConfigError
from . import hookspecs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "modelkiln"


@dataclass
class PluginInfo:
    name: str
    module: str
    distribution: str
    version: str
    hooks: list[str]


@dataclass
class Plugins:
    """The loaded plugins and what they contribute, by name."""

    manager: pluggy.PluginManager
    steps: dict = field(default_factory=dict)
    runtimes: dict = field(default_factory=dict)
    formats: list = field(default_factory=list)
    registry_kinds: dict = field(default_factory=dict)
    loaded: list[PluginInfo] = field(default_factory=list)
    # Plugins that failed to load or to contribute: name -> reason. Skipped, not fatal.
    errors: dict = field(default_factory=dict)


def _wrappers(manager: pluggy.PluginManager, plugin) -> list[str]:
    return [caller.name for caller in manager.get_hookcallers(plugin) or []
            for impl in caller.get_hookimpls()
            if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper)]


def make_plugin_manager(enabled=(), disabled=(), extra_plugins=(), errors=None) -> pluggy.PluginManager:
    """Build a manager: specs, then every enabled entry point, then ``extra_plugins``."""
    errors = {} if errors is None else errors
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for name in disabled:
        pm.set_blocked(name)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if enabled and ep.name not in enabled:
            continue
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
        except Exception as exc:  # a broken third-party plugin must not stop the daemon
            log.error("plugin %s (%s) failed to load and is skipped: %s", ep.name, ep.value, exc)
            errors[ep.name] = f"{type(exc).__name__}: {exc}"
    for plugin in extra_plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        if not enabled or name in enabled:
            pm.register(plugin, name=name)
    for name, plugin in pm.list_name_plugin():
        wrapped = _wrappers(pm, plugin)
        if wrapped:
            log.error("plugin %s wraps %s; hook wrappers are not supported (each implementation runs "
                      "on its own) and the plugin is skipped", name, ", ".join(wrapped))
            errors[name] = f"hook wrappers are not supported: {', '.join(wrapped)}"
            pm.unregister(plugin)
    pm.check_pending()
    return pm


def call_each(manager: pluggy.PluginManager, hook_name: str, *, errors: dict | None = None,
              newest_first: bool = False, let_through: tuple = (), **kwargs):
    """Call every implementation of a hook, one at a time; yield ``(plugin_name, result)``.

    An implementation that raises is logged by name (and recorded in ``errors``) and
    skipped. Implementations come in registration order, built-ins first, unless
    ``newest_first`` (pluggy's own calling order, which lets a later plugin override).
    Exceptions of the ``let_through`` types propagate.
    """
    impls = getattr(manager.hook, hook_name).get_hookimpls()
    for impl in reversed(impls) if newest_first else impls:
        try:
            result = impl.function(**{k: kwargs[k] for k in impl.argnames})
        except let_through:
            raise
        except Exception as exc:
            log.exception("plugin %s: %s failed; the daemon carries on", impl.plugin_name, hook_name)
            if errors is not None:
                errors[impl.plugin_name] = f"{hook_name}: {type(exc).__name__}: {exc}"
            continue
        yield impl.plugin_name, result


def first_result(manager: pluggy.PluginManager, hook_name: str, **kwargs):
    """A firstresult hook's answer as ``(plugin_name, result)``, or ``(None, None)``:
    the newest plugin asked first, a broken one skipped so it cannot block the decision."""
    for plugin_name, result in call_each(manager, hook_name, newest_first=True, **kwargs):
        if result is not None:
            return plugin_name, result
    return None, None


def notify(manager: pluggy.PluginManager, hook_name: str, **kwargs) -> None:
    """Call an event hook on every plugin; one that raises is logged and skipped."""
    for _ in call_each(manager, hook_name, **kwargs):
        pass


def start_plugins(manager: pluggy.PluginManager, config) -> None:
    """Call ``kiln_daemon_started``: a plugin's ConfigError stops the start (its settings
    are wrong and the operator must hear it); any other failure is logged and skipped."""
    for _ in call_each(manager, "kiln_daemon_started", let_through=(ConfigError,), config=config):
        pass


def load_plugins(enabled=(), disabled=(), extra_plugins=()) -> Plugins:
    errors: dict = {}
    pm = make_plugin_manager(enabled, disabled, extra_plugins, errors)
    plugins = Plugins(manager=pm, errors=errors)
    for plugin_name, steps in call_each(pm, "kiln_steps", errors=errors):
        for step in steps or ():
            if step.name in plugins.steps:
                log.error("plugin %s: step %s is already provided; ignored", plugin_name, step.name)
                continue
            step.plugin = plugin_name
            plugins.steps[step.name] = step
    # Registration order: built-in formats are tried before third-party ones, and the
    # first provider of a runtime or registry kind name wins.
    for plugin_name, runtimes in call_each(pm, "kiln_runtimes", errors=errors):
        for runtime in runtimes or ():
            runtime.plugin = plugin_name
            plugins.runtimes.setdefault(runtime.name, runtime)
    for plugin_name, formats in call_each(pm, "kiln_checkpoint_formats", errors=errors):
        for fmt in formats or ():
            fmt.plugin = plugin_name
            plugins.formats.append(fmt)
    for _, kinds in call_each(pm, "kiln_registry_kinds", errors=errors):
        for kind, cls in (kinds or {}).items():
            plugins.registry_kinds.setdefault(kind, cls)
    dists = {pm.get_name(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    for name, plugin in pm.list_name_plugin():
        dist = dists.get(name)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        plugins.loaded.append(PluginInfo(
            name, getattr(plugin, "__name__", type(plugin).__name__),
            dist.project_name if dist else "", dist.version if dist else "", hooks))
    return plugins


def plugins_for(config, extra_plugins=()) -> Plugins:
    return load_plugins(config.plugins.enabled, config.plugins.disabled, extra_plugins)
