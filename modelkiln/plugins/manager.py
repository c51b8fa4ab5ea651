"""The plugin manager factory, and what the loaded plugins contribute.

No manager is built at import time: ``load_plugins`` builds a fresh one (tests get their
own from a fixture). Built-in plugins are listed in this package's ``modelkiln``
entry-point group and loaded by the same loop as third-party ones, through pluggy's own
``load_setuptools_entrypoints``, one entry point at a time, so that one plugin that fails
to import is reported by name while the others load.

Every hook is called through ``call_each``: one implementation at a time, each inside
its own try/except, so a broken plugin is logged by name and the daemon goes on. It calls
them in the order pluggy's own ``pm.hook.<name>(...)`` would (``tryfirst`` ones first,
``trylast`` ones last, otherwise the plugin registered last first), so that a plugin
author's markers mean what pluggy documents. Hook wrappers (``wrapper=True``) are refused
when a plugin registers: they wrap the whole call, which this isolation never makes.

A plugin that pluggy would not accept (a hook name no spec declares, an argument its spec
does not have, a wrapper) is refused on its own, with its name and the reason in
``Plugins.errors``; the other plugins load.
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


def _refusal(manager: pluggy.PluginManager, plugin) -> str | None:
    """Why a registered plugin cannot stay, or None. Checked per plugin, because pluggy's
    ``check_pending`` raises for the first offender and so would refuse every plugin."""
    wrapped, unknown = [], []
    for caller in manager.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            if impl.wrapper or impl.hookwrapper:
                wrapped.append(caller.name)
            elif not caller.has_spec() and not impl.optionalhook:
                unknown.append(caller.name)
    if unknown:
        return (f"unknown hook {', '.join(sorted(unknown))} (no such hook in modelkiln.plugins.hookspecs; "
                f"misspelled, or mark it @hookimpl(optionalhook=True))")
    if wrapped:
        return f"hook wrappers are not supported (each implementation runs on its own): {', '.join(wrapped)}"
    return None


def _refuse(errors: dict, name: str, reason: str) -> None:
    log.error("plugin %s is not loaded: %s", name, reason)
    errors[name] = reason


def make_plugin_manager(enabled=(), disabled=(), extra_plugins=(), errors=None) -> pluggy.PluginManager:
    """Build a manager: specs, then every enabled entry point, then ``extra_plugins``.

    A plugin that fails to import or that pluggy refuses is left out and named in
    ``errors`` with the reason; it never keeps the others from loading."""
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
            _refuse(errors, ep.name, f"{ep.value} failed to load: {type(exc).__name__}: {exc}")
    for plugin in extra_plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        if enabled and name not in enabled:
            continue
        try:
            pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:  # ValueError: a name taken twice
            _refuse(errors, name, str(exc))
    for name, plugin in pm.list_name_plugin():
        reason = _refusal(pm, plugin)
        if reason is not None:
            _refuse(errors, name, reason)
            pm.unregister(plugin)
    pm.check_pending()  # cannot raise now; kept so that a gap in the loop above shows
    return pm


def call_each(manager: pluggy.PluginManager, hook_name: str, *, errors: dict | None = None,
              let_through: tuple = (), **kwargs):
    """Call every implementation of a hook, one at a time; yield ``(plugin_name, result)``.

    The order is pluggy's (``tryfirst`` first, ``trylast`` last, else the plugin registered
    last first). An implementation that raises is logged by name (and recorded in
    ``errors``) and skipped; exceptions of the ``let_through`` types propagate.
    """
    # get_hookimpls() lists trylast ones first and registration order within each group;
    # pluggy calls that list from its end.
    for impl in reversed(getattr(manager.hook, hook_name).get_hookimpls()):
        call_kwargs = {name: kwargs[name] for name in impl.argnames}
        call_kwargs.update((name, kwargs[name]) for name in impl.kwargnames if name in kwargs)
        try:
            result = impl.function(**call_kwargs)
        except let_through:
            raise
        except Exception as exc:
            log.exception("plugin %s: %s failed; the daemon carries on", impl.plugin_name, hook_name)
            if errors is not None:
                errors[impl.plugin_name] = f"{hook_name}: {type(exc).__name__}: {exc}"
            continue
        yield impl.plugin_name, result


def contributions(manager: pluggy.PluginManager, hook_name: str, errors: dict):
    """A contribution hook's answers as ``(plugin_name, result)`` in registration order,
    built-ins first: a step, runtime or registry kind name belongs to the plugin that
    registered first and formats are tried in that order, whatever markers a later plugin
    puts on its hook, so that installing a plugin never silently replaces a built-in."""
    rank = {name: i for i, (name, _) in enumerate(manager.list_name_plugin())}
    answers = list(call_each(manager, hook_name, errors=errors))
    return sorted(answers, key=lambda answer: rank[answer[0]])


def first_result(manager: pluggy.PluginManager, hook_name: str, **kwargs):
    """A firstresult hook's answer as ``(plugin_name, result)``, or ``(None, None)``:
    asked in pluggy's order, a broken plugin skipped so it cannot block the decision."""
    for plugin_name, result in call_each(manager, hook_name, **kwargs):
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
    for plugin_name, steps in contributions(pm, "kiln_steps", errors):
        for step in steps or ():
            if step.name in plugins.steps:
                log.error("plugin %s: step %s is already provided; ignored", plugin_name, step.name)
                continue
            step.plugin = plugin_name
            plugins.steps[step.name] = step
    for plugin_name, runtimes in contributions(pm, "kiln_runtimes", errors):
        for runtime in runtimes or ():
            runtime.plugin = plugin_name
            plugins.runtimes.setdefault(runtime.name, runtime)
    for plugin_name, formats in contributions(pm, "kiln_checkpoint_formats", errors):
        for fmt in formats or ():
            fmt.plugin = plugin_name
            plugins.formats.append(fmt)
    for _, kinds in contributions(pm, "kiln_registry_kinds", errors):
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
