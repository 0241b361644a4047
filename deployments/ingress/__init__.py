"""The Ingress process (CPU): the Serve deployment (deployment.py) under which the HTTP edge (http/) and the
handle API call one request core (service.py, with context, inputs, identities, people, controls, backends,
delivery, identity_score), and the async jobs (jobs/) run on the same replicas. docs/architecture.md."""
