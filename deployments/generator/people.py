"""A ``people`` task on the Generator: its ``PersonPlacement``s checked as they arrive, then handed to the
pipeline as ``Person``s with their keypoint images drawn on the output canvas (the Ingress placed them:
deployments/ingress/people.py)."""

from __future__ import annotations

from deployments.messages import GenerationTask, PersonPlacement


def accept_people(task: GenerationTask) -> None:
    """A people task's placements checked as they arrive (a replica never trusts what crossed the network)."""
    from instantid.errors import InvalidParameterError
    from instantid.face import validate_embedding, validate_keypoints
    from instantid.people import MAX_PEOPLE

    if len(task.people) > MAX_PEOPLE:
        raise InvalidParameterError("people", f"at most {MAX_PEOPLE} people, got {len(task.people)}")
    for person in task.people:
        if not isinstance(person, PersonPlacement):
            raise InvalidParameterError("people", f"expected PersonPlacement, got {type(person).__name__}")
        person.embedding = validate_embedding(person.embedding)
        person.kps = validate_keypoints(person.kps)
        person.region = tuple(int(v) for v in person.region)
        if len(person.region) != 4:
            raise InvalidParameterError("people", "a region is x1, y1, x2, y2")
    task.canvas = (int(task.width), int(task.height))


def pipeline_people(people: list[PersonPlacement], width: int, height: int) -> list:
    """Placements as the pipeline's ``Person``s, keypoints drawn on the output canvas."""
    from instantid.keypoints import draw_keypoints
    from instantid.people import Person

    return [Person(p.embedding, draw_keypoints(width, height, p.kps), p.region, p.kps) for p in people]
