"""Plugins: the hook specifications, the manager factory, recipes, and the built-in steps.

``hookimpl`` is the marker plugin authors decorate their hook functions with.
"""

import pluggy

hookimpl = pluggy.HookimplMarker("modelkiln")
