"""Hook specifications: the API reference for plugin authors.

A plugin is a module or object with functions decorated by ``modelkiln.hookimpl`` whose
names match the hooks below. Install it with an entry point in the ``modelkiln`` group::

    [project.entry-points.modelkiln]
    my_plugin = "my_package.kiln_plugin"

Hooks are always called with keyword arguments. Contribution hooks run in the daemon
and in every worker process; event hooks run in the daemon only, each implementation
inside its own try/except, so a broken plugin is logged by name and the daemon goes on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ..config import Config, PolicyConfig
    from .api import CheckpointFormat, Runtime, Step

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
def kiln_registry_kinds() -> dict[str, type]:
    """Contribute registry kinds, the places checkpoints come from.

    :returns: a mapping from the kind's name (the config's ``registry.kind``) to a class
        built as ``cls(config)`` that offers ``path`` (the local folder of version
        folders), ``watches`` (whether file-system events under it are worth watching),
        ``scan()`` and ``locate(path)`` like
        ``modelkiln.registry.directory.DirectoryRegistry``. A kind whose versions live
        elsewhere also offers ``poll_seconds``, ``poll()`` (bring new versions into
        ``path``, each renamed into place whole; returns how many arrived) and
        ``publish(promotion, variants)`` (write a current promotion back, idempotently),
        which run on the scheduler's thread, like
        ``modelkiln.registry.mlflow_registry.MlflowRegistry``.
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
def kiln_job_failed(job: dict) -> None:
    """Called when a job has failed for good (its reason recorded; not called for a job
    that is skipped, nor for one that goes back to pending to be tried again).

    :param job: ``id``, ``kind`` (``inspect`` or ``variant``), ``model``, ``version``,
        ``target`` (None for inspect jobs), ``variant`` (its label, or None), ``attempts``
        and ``reason``.
    """


@hookspec
def kiln_variant_measured(variant: dict) -> None:
    """Called once a variant has been built and measured (or has failed or been skipped).

    :param variant: the variant as ``kiln variants --json`` prints it: ``model``,
        ``version``, ``target``, ``runtime``, ``recipe``, ``status`` and ``metrics``
        or ``reason``.
    """


@hookspec
def kiln_variant_promoted(promotion: dict) -> None:
    """Called after a promotion has been recorded and the promoted link swapped.

    :param promotion: as ``kiln promoted --json`` prints one entry: ``model``,
        ``target``, ``variant``, ``recipe``, ``path`` and ``metrics``.
    """


# -- policy: which variant is served --------------------------------------------------


@hookspec(firstresult=True)
def kiln_choose_variant(candidates: list[dict], policy: PolicyConfig) -> dict | None:
    """Replace the promotion policy. The first implementation returning non-None wins;
    when all return None the built-in policy (``modelkiln.policy``) decides.

    :param candidates: every succeeded variant of one checkpoint on one target, each a
        dict as in ``kiln_variant_measured`` with ``id``, ``within_tolerance`` and
        ``fits_memory`` (its resident weights fit the target's ``memory_mb``) added.
    :param policy: the configured ``[policy]`` table.
    :returns: the chosen candidate (one of ``candidates``), or None to pass.
    """
