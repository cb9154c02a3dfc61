"""The router: caller auth, policy engine and detectors, pools, health checks,
forwarding and audit. (Built in the router issue.)"""
