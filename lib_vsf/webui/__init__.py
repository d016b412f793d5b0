"""WebUI glue for AUTOMATIC1111 and the Forge family: everything that touches a host lives here.

`hosts/` holds one adapter per host x model family; the rest (script args, infotext, XYZ axes, UI,
the per-generation runner) is shared by all hosts. Host modules (`modules.*`, `backend.*`) are only
imported lazily, so this package imports without a WebUI.
"""
