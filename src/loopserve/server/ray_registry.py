"""Routers of this process, by deployment name: the ingress reads the live replica set
from them. A module of its own because Ray Serve ships the router's module by value
(cloudpickle), which would give the router a private copy of any dict defined there."""

ROUTERS: dict = {}
