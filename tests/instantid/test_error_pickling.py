"""Library errors survive pickling, as they must when they cross Ray process boundaries."""

import pickle

import pytest

from instantid.errors import InvalidImageError, InvalidParameterError, NoFaceError, WeightsError


@pytest.mark.parametrize("error", [NoFaceError("photo.jpg"), InvalidParameterError("width", "must be a multiple of 8"),
                                   InvalidImageError("bad.png is not an image"), WeightsError("missing")])
def test_round_trip_keeps_type_message_and_fields(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error) and copy.code == error.code
    assert getattr(copy, "source", None) == getattr(error, "source", None)
    assert getattr(copy, "field", None) == getattr(error, "field", None)
