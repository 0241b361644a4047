"""Errors the library raises for things a caller got wrong, as opposed to bugs.

Every one carries a single-line, user-facing message. The CLI prints it to stderr and exits non-zero;
the Serve app maps each class to an HTTP status (see deployments/errors.py).
"""


class InstantIDError(Exception):
    """Base class: a problem with the caller's input or configuration."""

    code = "invalid_request"


class InvalidImageError(InstantIDError):
    """An unreadable file, or bytes that are not a supported image."""

    code = "invalid_image"


class NoFaceError(InstantIDError):
    """No face was detected in a named image."""

    code = "no_face"

    def __init__(self, source: str):
        super().__init__(f"no face found in {source}")
        self.source = source

    def __reduce__(self):  # errors cross process boundaries (Ray): rebuild from the constructor's arguments
        return type(self), (self.source,)


class InvalidParameterError(InstantIDError):
    """A parameter outside its allowed range (size not a multiple of 8, bad embedding, ...)."""

    code = "invalid_parameter"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def __reduce__(self):
        return type(self), (self.field, self.message)


class WeightsError(InstantIDError):
    """A model reference that does not resolve to a complete, well-formed set of weights."""

    code = "weights_error"
