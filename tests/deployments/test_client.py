"""The Python handle client: the same request/response models, no HTTP."""

from __future__ import annotations

import asyncio

import pytest

from deployments.client import InstantIDClient, ServiceError, encode_image
from deployments.ingress.schemas import GenerateRequest, GenerateResponse

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def client(serve_env):
    return InstantIDClient("instantid", timeout_s=120)


def test_handle_client_generates_with_the_http_models(client, face_photo):
    request = GenerateRequest(face_images=[encode_image(face_photo)], width=64, height=64, steps=2, seed=3,
                              num_images=2, prompt="via a handle")
    response = client.generate(request)
    assert isinstance(response, GenerateResponse)
    assert response.seed == 3 and response.model == "tiny" and len(response.images) == 2
    assert response.image_bytes()[0][:8] == b"\x89PNG\r\n\x1a\n"
    assert response.timings.denoise_s is not None and response.face.source == "face_images[0]"


def test_handle_client_identities_and_paths(client, face_photo):
    identity = client.create_identity([face_photo])  # a Path is read and encoded by the client
    assert client.get_identity(identity.identity_id).identity_id == identity.identity_id
    assert identity.identity_id in [i.identity_id for i in client.list_identities().identities]
    out = client.generate(identity_id=identity.identity_id, width=64, height=64, steps=2, output_format="webp")
    assert out.format == "webp" and out.image_bytes()[0][:4] == b"RIFF"
    client.delete_identity(identity.identity_id)
    with pytest.raises(ServiceError) as err:
        client.get_identity(identity.identity_id)
    assert err.value.status == 404 and err.value.code == "not_found"


def test_handle_client_errors_carry_status_code_and_field(client, face_photo):
    with pytest.raises(ServiceError) as err:
        client.generate(face_images=[face_photo], width=64, height=64, steps=2, base_model="nope")
    assert (err.value.status, err.value.code, err.value.field) == (422, "invalid_parameter", "base_model")
    with pytest.raises(ServiceError) as err:
        client.generate(face_images=[b"not an image"], width=64, height=64, steps=2)
    assert (err.value.status, err.value.code) == (400, "invalid_image")


def test_handle_client_async(client, face_photo):
    async def main():
        return await asyncio.gather(*[
            client.generate_async(face_images=[face_photo], width=64, height=64, steps=2, seed=i) for i in range(2)])

    results = asyncio.run(main())
    assert [r.seed for r in results] == [0, 1]
    assert client.models().models[0].name == "tiny"


def test_every_method_has_an_async_twin():
    public = {name for name in vars(InstantIDClient) if not name.startswith("_")}
    assert public, public
    missing = sorted(name for name in public if not name.endswith("_async") and f"{name}_async" not in public)
    assert not missing, missing


def test_handle_list_and_models_async_twins(client, face_photo):
    identity = client.create_identity([face_photo])

    async def main():
        return await asyncio.gather(client.list_identities_async(limit=1000), client.models_async())

    listed, models = asyncio.run(main())
    assert identity.identity_id in [i.identity_id for i in listed.identities]
    assert models == client.models()
    client.delete_identity(identity.identity_id)


@pytest.mark.parametrize("limit", [0, 1001, -5, 10**12, "10", 2.5, True])
def test_handle_list_identities_is_bounded_like_http(client, http, limit):
    with pytest.raises(ServiceError) as err:
        client.list_identities(limit)
    assert (err.value.status, err.value.code, err.value.field) == (422, "invalid_parameter", "limit")
    if isinstance(limit, int) and not isinstance(limit, bool):
        assert http.get("/v1/identities", params={"limit": limit}).status_code == 422
