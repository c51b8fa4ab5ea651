"""The plugin system only: the hook specifications, the typed contracts plugins implement
or receive (``api``), the manager that loads them, and recipes (chains of steps).

``hookimpl`` is the marker plugin authors decorate their hook functions with.
"""

import pluggy

hookimpl = pluggy.HookimplMarker("modelkiln")
