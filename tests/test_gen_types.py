"""The page's TypeScript types are generated from the protocol documents
(tests/gen_types.py): the checked-in files are what the generator writes now."""

from __future__ import annotations

import copy

import pytest

from tests import gen_types


@pytest.mark.django_db
def test_the_checked_in_typescript_types_are_generated_from_the_documents(client):
    openapi = client.get("/api/v1/openapi.json").json()
    for path, text in gen_types.generated(openapi).items():
        assert path.read_text() == text, (
            f"{path.relative_to(gen_types.ROOT)} differs from the documents: "
            "run .venv/bin/python tests/gen_types.py"
        )


def test_a_new_frame_in_the_document_is_a_new_type():
    doc = copy.deepcopy(gen_types.asyncapi_document())
    doc["components"]["messages"]["runPause"] = {
        "name": "run.pause",
        "payload": {
            "type": "object",
            "required": ["type", "run_id"],
            "properties": {
                "type": {"const": "run.pause"},
                "run_id": {"$ref": "#/components/schemas/Id"},
                "until": {"type": ["integer", "null"]},
            },
        },
    }
    doc["channels"]["chat"]["messages"]["runPause"] = {"$ref": "#/components/messages/runPause"}
    doc["operations"]["receiveClientFrames"]["messages"].append(
        {"$ref": "#/channels/chat/messages/runPause"}
    )
    generated = gen_types.protocol_ts(doc)
    assert (
        'export interface RunPauseFrame {\n  type: "run.pause";\n  run_id: Id;\n'
        "  until?: number | null;\n}\n"
    ) in generated
    client_union = generated.split("export type ClientFrame =", 1)[1].split(";", 1)[0]
    assert "| RunPauseFrame" in client_union
    assert "RunPauseFrame" not in generated.split("export type ServerFrame =", 1)[1]
