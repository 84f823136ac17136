"""One package per API dialect, each a thin translation onto the serving core (router, protocol, serving)."""
