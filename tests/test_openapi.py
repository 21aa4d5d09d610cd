"""The hand-written OpenAPI document: sound schemas, valid examples, every route described."""

from __future__ import annotations

import re
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from starlette.routing import Route

from jobd.app import create_app
from jobd.config import Config
from jobd.openapi import docs_page, document


def examples() -> list[tuple[str, dict[str, Any], Any]]:
    """(where, schema, example) for every example in the document."""
    found = []
    for path, item in document()["paths"].items():
        for method, operation in item.items():
            bodies = [("request", operation.get("requestBody", {}).get("content", {}))]
            bodies += [(status, response.get("content", {}))
                       for status, response in operation["responses"].items()]
            for label, content in bodies:
                for media, body in content.items():
                    if media != "application/json":
                        continue
                    where = f"{method.upper()} {path} {label}"
                    if "example" in body:
                        found.append((where, body["schema"], body["example"]))
                    for name, example in body.get("examples", {}).items():
                        found.append((f"{where} ({name})", body["schema"], example["value"]))
    return found


def test_schemas_are_valid_json_schema() -> None:
    Draft202012Validator.check_schema({"$defs": document()["components"]["schemas"]})


@pytest.mark.parametrize(("where", "schema", "example"), examples(),
                         ids=[e[0] for e in examples()])
def test_every_example_matches_its_schema(where: str, schema: dict[str, Any],
                                          example: Any) -> None:
    root = {**schema, "components": document()["components"]}
    errors = [e.message for e in Draft202012Validator(root).iter_errors(example)]
    assert errors == [], where


def test_every_route_of_the_app_is_described() -> None:
    app = create_app(Config())
    described = {(method, path) for path, item in document()["paths"].items()
                 for method in item}
    for route in app.routes:
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path)
        for method in route.methods or ():
            if method != "HEAD":
                assert (method.lower(), path) in described, f"{method} {path} is not documented"


def test_every_operation_has_an_id_summary_and_error_answers() -> None:
    ids = set()
    for path, item in document()["paths"].items():
        for method, operation in item.items():
            assert operation["operationId"] not in ids
            ids.add(operation["operationId"])
            assert operation["summary"]
            if path.startswith("/api/v1/jobs/{id}"):
                assert "404" in operation["responses"], (method, path)


def test_docs_page_is_self_contained() -> None:
    page = docs_page().decode()
    assert "<script src" not in page and "<link" not in page
    assert "fetch(\"./openapi.json\")" in page
