"""Reading image files out of multipart bodies (the server's own parser)."""

from __future__ import annotations

import pytest
from urllib3 import encode_multipart_formdata

from digitflow.uploads import MalformedForm, TooManyFiles, multipart_files


def test_file_parts_come_back_in_order_with_their_names_and_fields_are_skipped() -> None:
    body, content_type = encode_multipart_formdata(
        [
            ("file", ("a.png", b"\x89PNG first\r\n--not a boundary")),
            ("note", "a plain field"),
            ("other", ("b.jpg", bytes(range(256)) * 40)),
        ]
    )
    files = multipart_files(body, content_type, max_files=4)
    assert files == [
        ("a.png", b"\x89PNG first\r\n--not a boundary"),
        ("b.jpg", bytes(range(256)) * 40),
    ]


def test_more_files_than_allowed_are_refused() -> None:
    body, content_type = encode_multipart_formdata(
        [("file", (f"{index}.png", b"x")) for index in range(3)]
    )
    with pytest.raises(TooManyFiles, match="at most 2"):
        multipart_files(body, content_type, max_files=2)


@pytest.mark.parametrize(
    ("body", "content_type", "problem"),
    [
        (b"--x\r\nno headers end", "multipart/form-data", "no boundary"),
        (
            b"garbage without any boundary",
            "multipart/form-data; boundary=abc",
            "boundary character",
        ),
    ],
    ids=["no-boundary", "garbage"],
)
def test_a_malformed_body_is_named(body: bytes, content_type: str, problem: str) -> None:
    with pytest.raises(MalformedForm, match=problem):
        multipart_files(body, content_type, max_files=4)
