"""The Sparkplug B message classes, built at import from sparkplug_b.proto (no protoc, no generated code).

The reader below understands the part of the proto2 language that file uses: `syntax`, `package`,
enums, messages nested in messages, `optional`/`repeated` scalar or message fields and `oneof`. It turns
them into a FileDescriptorProto, and the `protobuf` package builds the classes from that.

Owns the proto reader and the classes. Must not build metrics or open sessions.
"""
from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from edge.errors import EdgeError

PROTO_FILE = Path(__file__).with_name("sparkplug_b.proto")

_SCALARS = {name: getattr(descriptor_pb2.FieldDescriptorProto, f"TYPE_{name.upper()}")
            for name in ("double", "float", "int64", "uint64", "int32", "uint32", "bool", "string", "bytes",
                         "sint32", "sint64", "fixed32", "fixed64", "sfixed32", "sfixed64")}
_TOKEN = re.compile(r'\s*(?:(//[^\n]*)|("[^"]*")|([A-Za-z_][\w.]*)|(\d+)|([{}=;]))')


class SchemaError(EdgeError):
    """sparkplug_b.proto uses syntax the schema reader does not know."""


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip():
                raise SchemaError(f"{PROTO_FILE}: cannot read {text[pos:pos + 30]!r}")
            break
        pos = m.end()
        if m.group(1) is None:
            out.append(next(g for g in m.groups()[1:] if g is not None))
    return out


class _Reader:
    def __init__(self, tokens: list[str]):
        self.tokens, self.i = tokens, 0

    def take(self, expected: str | None = None) -> str:
        if self.i >= len(self.tokens):
            raise SchemaError(f"{PROTO_FILE}: ends early" + (f", expected {expected!r}" if expected else ""))
        token = self.tokens[self.i]
        self.i += 1
        if expected is not None and token != expected:
            raise SchemaError(f"{PROTO_FILE}: expected {expected!r}, found {token!r}")
        return token

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def enum(self, into: descriptor_pb2.EnumDescriptorProto) -> None:
        into.name = self.take()
        self.take("{")
        while self.peek() != "}":
            value = into.value.add(name=self.take())
            self.take("=")
            value.number = int(self.take())
            self.take(";")
        self.take("}")

    def field(self, into, label: int, oneof_index: int | None = None) -> None:
        type_name, name = self.take(), self.take()
        self.take("=")
        f = into.field.add(name=name, number=int(self.take()), label=label)
        self.take(";")
        if type_name in _SCALARS:
            f.type = _SCALARS[type_name]
        else:  # a message type; resolved relative to the enclosing scopes by the pool
            f.type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
            f.type_name = type_name
        if oneof_index is not None:
            f.oneof_index = oneof_index

    def message(self, into: descriptor_pb2.DescriptorProto) -> None:
        into.name = self.take()
        self.take("{")
        labels = {"optional": descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
                  "repeated": descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
                  "required": descriptor_pb2.FieldDescriptorProto.LABEL_REQUIRED}
        while (token := self.take()) != "}":
            if token == "message":
                self.message(into.nested_type.add())
            elif token == "enum":
                self.enum(into.enum_type.add())
            elif token in labels:
                self.field(into, labels[token])
            elif token == "oneof":
                into.oneof_decl.add(name=self.take())
                index = len(into.oneof_decl) - 1
                self.take("{")
                while self.peek() != "}":
                    self.field(into, labels["optional"], index)
                self.take("}")
            else:
                raise SchemaError(f"{PROTO_FILE}: unexpected {token!r} in message {into.name}")


def file_descriptor(text: str) -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name="anomaly_edge/sparkplug_b.proto")
    r = _Reader(_tokens(text))
    while (token := r.peek()) is not None:
        r.take()
        if token == "syntax":
            r.take("=")
            fd.syntax = r.take().strip('"')
            r.take(";")
        elif token == "package":
            fd.package = r.take()
            r.take(";")
        elif token == "enum":
            r.enum(fd.enum_type.add())
        elif token == "message":
            r.message(fd.message_type.add())
        else:
            raise SchemaError(f"{PROTO_FILE}: unexpected {token!r} at the top level")
    # Message-typed fields name their type as written; make the names absolute for the pool.
    for message in fd.message_type:
        for field in message.field:
            if field.type_name and not field.type_name.startswith("."):
                field.type_name = f".{fd.package}.{message.name}.{field.type_name}"
    return fd


_pool = descriptor_pool.DescriptorPool()
_file = _pool.Add(file_descriptor(PROTO_FILE.read_text()))
_package = _file.package

Payload = message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{_package}.Payload"))
Metric = Payload.Metric
DATA_TYPES: dict[str, int] = {v.name: v.number for v in _pool.FindEnumTypeByName(f"{_package}.DataType").values}
DATA_TYPE_NAMES: dict[int, str] = {n: name for name, n in DATA_TYPES.items()}

# Which oneof member carries each data type's value (specification 3.0, section 6.4.16).
VALUE_FIELD = {**{t: "int_value" for t in ("Int8", "Int16", "Int32", "UInt8", "UInt16", "UInt32")},
               **{t: "long_value" for t in ("Int64", "UInt64", "DateTime")},
               "Float": "float_value", "Double": "double_value", "Boolean": "boolean_value",
               **{t: "string_value" for t in ("String", "Text", "UUID")}, "Bytes": "bytes_value"}
