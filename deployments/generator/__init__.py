"""The Generator process (GPU): the Serve deployment, its core and device queue (deployment.py), and what a task
carries checked on arrival (controls.py: control maps; people.py: placements)."""
