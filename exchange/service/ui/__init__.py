"""The Data Exchange window: a small server-rendered web page for a node.

``exchange run --ui-port N`` serves it beside the service (:class:`server.UiAddon`);
``exchange ui`` serves it alone. A store sees its last sync, a Sync button,
its Received and Sent bundles, parked documents and the doctor's checks; the
HO sees one row per store. See docs/UI.md.
"""
