"""The FaceAnalyzer process (CPU face group): the Serve deployment and its core (deployment.py), and the control
maps derived beside the face analysis (control_maps.py)."""
