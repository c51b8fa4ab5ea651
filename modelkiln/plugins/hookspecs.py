"""Hook specifications: the API reference for plugin authors.

A plugin is a module or object with functions decorated by ``modelkiln.hookimpl`` whose
names match the hooks below. Install it with an entry point in the ``modelkiln`` group::

    [project.entry-points.modelkiln]
    my_plugin = "my_package.kiln_plugin"

Hooks are always called with keyword arguments, one implementation at a time, each inside
its own try/except, so a broken plugin is logged by name and the daemon goes on; hook
wrappers (``wrapper=True``) are therefore not supported, and a plugin that declares one is
not loaded. The calling order is pluggy's: ``@hookimpl(tryfirst=True)`` first,
``trylast=True`` last, otherwise the plugin registered last first (built-ins register
before third-party plugins). Contributions are the exception: a name belongs to the plugin
registered first and formats are tried in registration order, so no plugin replaces a
built-in by being installed. A plugin that implements a hook not listed here (a misspelled
name) is not loaded, and ``kiln plugins`` says why; the others load. Contribution hooks run
in the daemon and in every worker process; event hooks run in the daemon only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ..config import Config, PolicyConfig
    from .api import CheckpointFormat, JobEvent, PromotionEvent, RegistryKind, Runtime, Step, VariantEvent

hookspec = pluggy.HookspecMarker("modelkiln")


# -- contributions: what the plugin adds ---------------------------------------------


@hookspec
def kiln_steps() -> list[Step]:
    """Contribute optimization steps.

    :returns: a list of ``modelkiln.plugins.api.Step`` instances. Step names are
        ``family.variant`` (e.g. ``quantize.int8_dynamic``) and must be unique across
        all plugins.
    """


@hookspec
def kiln_runtimes() -> list[Runtime]:
    """Contribute runtimes, the serving side of targets (e.g. ``onnxruntime``, ``torch``).

    :returns: a list of ``modelkiln.plugins.api.Runtime`` instances; a target's
        ``runtimes`` key names them.
    """


@hookspec
def kiln_checkpoint_formats() -> list[CheckpointFormat]:
    """Contribute checkpoint formats.

    Formats are tried in registration order and the first whose ``detect`` accepts the
    folder's file names loads it; loading runs in a worker process.

    :returns: a list of ``modelkiln.plugins.api.CheckpointFormat`` instances.
    """


@hookspec
def kiln_registry_kinds() -> dict[str, type[RegistryKind]]:
    """Contribute registry kinds, the places checkpoints come from.

    :returns: a mapping from the kind's name (the config's ``registry.kind``) to a
        subclass of ``modelkiln.plugins.api.RegistryKind``, built as ``cls(config)``:
        ``scan()`` and ``locate(path)`` find version folders under its ``path``; a kind
        whose versions live elsewhere sets ``poll_seconds`` and implements ``poll()`` and
        ``publish(promotion, variants)`` (see ``modelkiln.registry.mlflow_registry``).
    """


# -- events: what the plugin reacts to ------------------------------------------------


@hookspec
def kiln_daemon_started(config: Config) -> None:
    """Called once in the daemon when it has started, before it takes any work: the place
    to read the plugin's own settings and start its threads.

    A plugin's settings live in the config's ``[plugins.settings.<plugin name>]`` table,
    which modelkiln passes through unchecked: check them here and raise
    ``modelkiln.errors.ConfigError`` naming ``config.source`` and the key to refuse to
    start; any other exception is logged and the daemon goes on without the plugin.

    :param config: the daemon's whole configuration (``modelkiln.config.Config``).
    """


@hookspec
def kiln_daemon_stopping() -> None:
    """Called once when the daemon stops, after running jobs were finished or handed
    back: flush what the plugin still holds (a queue of events) and stop its threads."""


@hookspec
def kiln_job_failed(job: JobEvent) -> None:
    """Called when a job has failed for good (its reason recorded; not called for a job
    that is skipped, nor for one that goes back to pending to be tried again).

    :param job: a ``modelkiln.plugins.api.JobEvent``: ``id``, ``kind`` (``inspect``,
        ``variant`` or ``runoff``), ``model``, ``version``, ``target`` (None for inspect
        jobs), ``variant`` (its label, or None), ``attempts`` and ``reason``.
    """


@hookspec
def kiln_variant_ended(variant: VariantEvent) -> None:
    """Called once a variant's job has ended: built and measured (``status``
    "succeeded", with ``metrics``, and a ``reason`` when it misses the quality gate), or
    "failed", "skipped" or "cancelled" (with ``reason``).

    :param variant: a ``modelkiln.plugins.api.VariantEvent``, the variant as ``kiln
        variants --json`` prints it: ``model``, ``version``, ``target``, ``runtime``,
        ``recipe``, ``status`` and ``metrics`` or ``reason``.
    """


@hookspec
def kiln_variant_promoted(promotion: PromotionEvent) -> None:
    """Called after a promotion has been recorded and the promoted link swapped.
    Promotion is anytime: one checkpoint may be promoted several times on a target as
    better variants are measured (``reason`` says why each time).

    :param promotion: a ``modelkiln.plugins.api.PromotionEvent``, as ``kiln promoted
        --json`` prints one entry: ``model``, ``target``, ``variant``, ``recipe``,
        ``path`` and ``metrics``.
    """


# -- policy: which variant is served --------------------------------------------------


@hookspec(firstresult=True)
def kiln_choose_variant(candidates: list[VariantEvent], policy: PolicyConfig) -> VariantEvent | None:
    """Replace the promotion policy. The first implementation returning non-None, in the
    calling order above (``tryfirst`` first, then the newest plugin), wins; when all return None the built-in policy (``modelkiln.policy``) decides.

    :param candidates: every succeeded variant of one checkpoint on one target, each a
        ``VariantEvent`` with ``within_tolerance`` and ``fits_memory`` (its resident
        weights fit the target's ``memory_mb``) set.
    :param policy: the configured ``[policy]`` table.
    :returns: the chosen candidate (one of ``candidates``), or None to pass.
    """
