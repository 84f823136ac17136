"""HTTP routers, one per API surface."""
