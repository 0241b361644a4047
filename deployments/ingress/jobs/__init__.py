"""Async jobs on the Ingress replicas: the job core (service.py), its store (store.py: Redis or memory) and the
webhooks (webhooks.py). No HTTP: the surfaces format the records."""
