"""Image files out of a multipart/form-data body, for `digitflow serve`.

python-multipart's streaming parser writes each part straight into bytes. Starlette's form
parser, built on the same parser, gives every file its own spooled temporary file: for a request
of one small image that was about a tenth of the server's Python per request.
"""

from __future__ import annotations

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header


class MalformedForm(ValueError):
    """The body is not a multipart form that can be read; the message says why."""


class TooManyFiles(ValueError):
    """The form holds more files than one request may."""


def multipart_files(body: bytes, content_type: str, max_files: int) -> list[tuple[str, bytes]]:
    """The (filename, bytes) of every file part of a form, in order; parts without a filename
    (plain fields) are skipped, at most `max_files` of them are allowed."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise MalformedForm("no boundary in the multipart content type")
    files: list[tuple[str, bytes]] = []
    fields = 0
    headers: dict[bytes, bytes] = {}
    name, value, chunks = bytearray(), bytearray(), []

    def on_part_begin() -> None:
        headers.clear()
        chunks.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(name).lower()] = bytes(value)
        name.clear()
        value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        nonlocal fields
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        if b"filename" not in disposition:
            fields += 1
            if fields > max_files:
                raise MalformedForm(f"more than {max_files} form fields")
            return
        try:
            filename = disposition[b"filename"].decode()
        except UnicodeDecodeError:
            raise MalformedForm("a file name is not valid UTF-8") from None
        files.append((filename, b"".join(chunks)))
        if len(files) > max_files:
            raise TooManyFiles(f"more than {max_files} images; at most {max_files} per request")

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise MalformedForm(str(exc)) from None
    return files
