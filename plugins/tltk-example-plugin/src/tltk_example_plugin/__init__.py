"""An example tltk plugin: one component of each kind, added through entry points only.

The modules the entry points name (``backbone``, ``head``, ``strategy``, ``markdown``,
``npz``, ``budget``) are cheap to import: tltk imports one when ``tltk plugins`` checks it or when
someone uses its component, so the torch code lives in ``networks`` and is imported by
the factories when they build something.
"""

TLTK_PLUGIN_API = "1.0"  # the tltk.plugin API this package is written against
