"""The plugin manager factory and the catalogue of what plugins contribute.

No manager is built at import time: ``make_plugin_manager`` builds a fresh one (tests
get their own from a fixture). Built-in plugins are listed in this package's
``modelkiln`` entry-point group and loaded by the same loop as third-party ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import pluggy

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
class Catalog:
    """Everything the loaded plugins contribute, by name."""

    manager: pluggy.PluginManager
    steps: dict = field(default_factory=dict)
    runtimes: dict = field(default_factory=dict)
    formats: list = field(default_factory=list)
    registry_kinds: dict = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    # Plugins that failed to load: name -> reason. They are skipped, not fatal.
    errors: dict = field(default_factory=dict)

    def unavailable_reason(self, target) -> str | None:
        """None when this host can serve ``target`` (a TargetConfig), else why not."""
        from ..targets.devices import unavailable_reason as device_reason

        # Whether the hardware is here (once per target), then whether each runtime serves it.
        reasons = [device_reason(target.device, getattr(target, "devices", 1))]
        for name in target.runtimes:
            runtime = self.runtimes.get(name)
            reasons.append(f"runtime {name} is not installed" if runtime is None
                           else runtime.unavailable_reason(target.device))
        return "; ".join(r for r in reasons if r) or None


def _wanted(name: str, enabled, disabled) -> bool:
    if name in disabled:
        return False
    return not enabled or name in enabled


def make_plugin_manager(enabled=(), disabled=(), extra_plugins=(), errors=None):
    """Build a manager: specs, then every enabled entry point, then ``extra_plugins``."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if not _wanted(ep.name, enabled, disabled) or pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken third-party plugin must not stop the daemon
            log.error("plugin %s (%s) failed to load and is skipped: %s", ep.name, ep.value, exc)
            if errors is not None:
                errors[ep.name] = f"{type(exc).__name__}: {exc}"
            continue
        pm._kiln_dist = getattr(pm, "_kiln_dist", {})
        pm._kiln_dist[ep.name] = (ep.dist.name, ep.dist.version) if ep.dist else ("?", "?")
    for plugin in extra_plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        if _wanted(name, enabled, disabled):
            pm.register(plugin, name=name)
    pm.check_pending()
    return pm


def _collect(manager, hook_name: str, errors: dict) -> list:
    """Call a contribution hook one implementation at a time, so that one broken plugin
    is reported by name while the others still contribute."""
    items = []
    for impl in getattr(manager.hook, hook_name).get_hookimpls():
        try:
            result = impl.function()
        except Exception as exc:
            log.error("plugin %s: %s failed: %s", impl.plugin_name, hook_name, exc)
            errors[impl.plugin_name] = f"{hook_name}: {type(exc).__name__}: {exc}"
            continue
        if result:
            items.append((impl.plugin_name, result))
    # get_hookimpls() is in registration order (pluggy *calls* the newest first): built-in
    # formats are tried before third-party ones, and the first provider of a name wins.
    return items


def build_catalog(enabled=(), disabled=(), extra_plugins=()) -> Catalog:
    errors: dict = {}
    pm = make_plugin_manager(enabled, disabled, extra_plugins, errors)
    catalog = Catalog(manager=pm, errors=errors)
    for plugin_name, steps in _collect(pm, "kiln_steps", errors):
        for step in steps:
            if step.name in catalog.steps:
                log.error("plugin %s: step %s is already provided; ignored", plugin_name, step.name)
                continue
            step.plugin = plugin_name
            catalog.steps[step.name] = step
    for plugin_name, runtimes in _collect(pm, "kiln_runtimes", errors):
        for runtime in runtimes:
            runtime.plugin = plugin_name
            catalog.runtimes.setdefault(runtime.name, runtime)
    for plugin_name, formats in _collect(pm, "kiln_checkpoint_formats", errors):
        for fmt in formats:
            fmt.plugin = plugin_name
            catalog.formats.append(fmt)
    for plugin_name, kinds in _collect(pm, "kiln_registry_kinds", errors):
        for kind, cls in kinds.items():
            catalog.registry_kinds.setdefault(kind, cls)
    dists = getattr(pm, "_kiln_dist", {})
    for name, plugin in pm.list_name_plugin():
        dist, version = dists.get(name, ("", ""))
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        catalog.plugins.append(
            PluginInfo(name, getattr(plugin, "__name__", type(plugin).__name__), dist, version, hooks)
        )
    return catalog


def catalog_for(config, extra_plugins=()) -> Catalog:
    return build_catalog(config.plugins.enabled, config.plugins.disabled, extra_plugins)


def first_result(manager: pluggy.PluginManager, hook_name: str, **kwargs):
    """Call a firstresult hook; an implementation that raises is logged by name and the
    next one is asked, so a broken plugin cannot block what it was asked to decide."""
    for impl in getattr(manager.hook, hook_name).get_hookimpls()[::-1]:
        try:
            result = impl.function(**{k: kwargs[k] for k in impl.argnames})
        except Exception:
            log.exception("plugin %s: %s failed; asking the next one", impl.plugin_name, hook_name)
            continue
        if result is not None:
            return impl.plugin_name, result
    return None, None


def start_plugins(manager: pluggy.PluginManager, config) -> None:
    """Call ``kiln_daemon_started``: a plugin's ConfigError stops the start (its settings
    are wrong and the operator must hear it); any other failure is logged and skipped."""
    from ..errors import ConfigError

    for impl in manager.hook.kiln_daemon_started.get_hookimpls():
        try:
            impl.function(config=config)
        except ConfigError:
            raise
        except Exception:
            log.exception("plugin %s: kiln_daemon_started failed; the daemon carries on", impl.plugin_name)


def notify(manager: pluggy.PluginManager, hook_name: str, **kwargs) -> None:
    """Call an event hook; an implementation that raises is logged by name and skipped."""
    for impl in getattr(manager.hook, hook_name).get_hookimpls():
        try:
            impl.function(**{k: kwargs[k] for k in impl.argnames})
        except Exception:
            log.exception("plugin %s: %s failed; the daemon carries on", impl.plugin_name, hook_name)
