"""API surfaces: each module adds one API's routes and only translates its request and response shapes to and
from ``GenerationService`` (the LitServe "spec" idea). ``native`` is this service's own /v1 API."""
