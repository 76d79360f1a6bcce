"""The vendored A2A contract (third_party/a2a/a2a.proto): write it from the pinned SDK, or
check that it still matches.

Usage: python scripts/a2a-proto.py [--check]

The contract's source of truth is the descriptor the pinned ``a2a-sdk`` embeds
(``a2a.types.a2a_pb2``): that is the code every A2A call here runs through. The
vendored file is that descriptor written back as ``.proto`` text, so buf can lint
and compare it (``buf breaking`` catches an SDK upgrade that breaks the contract)
and Envoy's transcoder descriptor can be built from a file. Upstream's comments
are not in the descriptor, so they are not in the file: read the A2A
specification for them.

``--check`` compiles the vendored file with protoc and compares its
FileDescriptorProto with the SDK's, ignoring source info: any difference (an
SDK upgrade, a hand edit) fails with the differing fields.

After upgrading ``a2a-sdk``: run this without ``--check``, then ``make contracts``
(buf breaking compares it against the committed one).
"""

from __future__ import annotations

import argparse
import difflib
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools
from a2a.types import a2a_pb2
from google.api import field_behavior_pb2
from google.protobuf import descriptor_pb2, text_format

ROOT = Path(__file__).resolve().parent.parent
VENDORED = ROOT / "third_party" / "a2a" / "a2a.proto"
THIRD_PARTY = ROOT / "third_party" / "proto"
_INDENT = "  "

_LABELS = {
    descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE: "double",
    descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT: "float",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT64: "int64",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "uint64",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "int32",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED64: "fixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED32: "fixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool",
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "bytes",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT32: "uint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED32: "sfixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED64: "sfixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT32: "sint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT64: "sint64",
}


def sdk_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The pinned SDK's descriptor of a2a.proto."""
    proto = descriptor_pb2.FileDescriptorProto()
    a2a_pb2.DESCRIPTOR.CopyToProto(proto)
    return proto


def _parsed(data: bytes) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    proto.ParseFromString(data)
    proto.ClearField("source_code_info")
    return proto


class _Writer:
    def __init__(self, package: str) -> None:
        self.package = package
        self.lines: list[str] = []

    def line(self, depth: int, text: str = "") -> None:
        self.lines.append(f"{_INDENT * depth}{text}" if text else "")

    def type_name(self, name: str) -> str:
        # Names in our package are written relative to it, others in full.
        local = f".{self.package}."
        return name[len(local) :] if name.startswith(local) else name.lstrip(".")

    def file(self, proto: descriptor_pb2.FileDescriptorProto) -> str:
        self.line(0, f'syntax = "{proto.syntax or "proto2"}";')
        self.line(0)
        self.line(0, f"package {proto.package};")
        self.line(0)
        for dependency in proto.dependency:
            self.line(0, f'import "{dependency}";')
        self.line(0)
        for option, value in proto.options.ListFields():
            self.line(0, f"option {option.name} = {_scalar(value)};")
        for service in proto.service:
            self.line(0)
            self.service(service)
        for message in proto.message_type:
            self.line(0)
            self.message(message, 0, f".{self.package}")
        for enum in proto.enum_type:
            self.line(0)
            self.enum(enum, 0)
        return "\n".join(self.lines) + "\n"

    def service(self, service: descriptor_pb2.ServiceDescriptorProto) -> None:
        self.line(0, f"service {service.name} {{")
        for method in service.method:
            request = ("stream " if method.client_streaming else "") + self.type_name(
                method.input_type
            )
            response = ("stream " if method.server_streaming else "") + self.type_name(
                method.output_type
            )
            head = f"rpc {method.name}({request}) returns ({response})"
            options = self.method_options(method.options)
            if not options:
                self.line(1, f"{head};")
                continue
            self.line(1, f"{head} {{")
            for option in options:
                for text in option:
                    self.line(2, text)
            self.line(1, "}")
        self.line(0, "}")

    def method_options(self, options: descriptor_pb2.MethodOptions) -> list[list[str]]:
        written: list[list[str]] = []
        for option, value in options.ListFields():
            if option.is_extension and option.full_name == "google.api.http":
                body = text_format.MessageToString(value).splitlines()
                written.append(
                    ["option (google.api.http) = {", *(f"{_INDENT}{b}" for b in body), "};"]
                )
            elif option.is_extension and option.full_name == "google.api.method_signature":
                written += [[f'option (google.api.method_signature) = "{sig}";'] for sig in value]
            elif not option.is_extension:
                written.append([f"option {option.name} = {_scalar(value)};"])
            else:
                raise SystemExit(f"a2a-proto: method option {option.full_name} is not written")
        return written

    def message(self, message: descriptor_pb2.DescriptorProto, depth: int, scope: str) -> None:
        self.line(depth, f"message {message.name} {{")
        scope = f"{scope}.{message.name}"
        maps = {f"{scope}.{n.name}": n for n in message.nested_type if n.options.map_entry}
        for nested in message.nested_type:
            if not nested.options.map_entry:
                self.message(nested, depth + 1, scope)
        for enum in message.enum_type:
            self.enum(enum, depth + 1)
        real_oneofs = {
            index
            for index, _ in enumerate(message.oneof_decl)
            if not any(
                f.proto3_optional and f.oneof_index == index and f.HasField("oneof_index")
                for f in message.field
            )
        }
        open_oneof: int | None = None
        for field in message.field:
            index = field.oneof_index if field.HasField("oneof_index") else None
            if index is not None and index not in real_oneofs:
                index = None
            if open_oneof is not None and index != open_oneof:
                self.line(depth + 1, "}")
                open_oneof = None
            if index is not None and open_oneof is None:
                self.line(depth + 1, f"oneof {message.oneof_decl[index].name} {{")
                open_oneof = index
            inner = depth + 2 if open_oneof is not None else depth + 1
            self.line(inner, self.field(field, maps))
        if open_oneof is not None:
            self.line(depth + 1, "}")
        for start, end in ((r.start, r.end) for r in message.reserved_range):
            last = end - 1
            self.line(depth + 1, f"reserved {start}" + (f" to {last};" if last > start else ";"))
        if message.reserved_name:
            names = ", ".join(f'"{n}"' for n in message.reserved_name)
            self.line(depth + 1, f"reserved {names};")
        self.line(depth, "}")

    def field(
        self,
        field: descriptor_pb2.FieldDescriptorProto,
        maps: dict[str, descriptor_pb2.DescriptorProto],
    ) -> str:
        typed = self.type_name(field.type_name) if field.type_name else _LABELS[field.type]
        entry = maps.get(field.type_name)
        if entry is not None and field.label == field.LABEL_REPEATED:
            key, value = entry.field
            key_type = _LABELS[key.type]
            value_type = self.type_name(value.type_name) if value.type_name else _LABELS[value.type]
            text = f"map<{key_type}, {value_type}> {field.name} = {field.number}"
        else:
            label = ""
            if field.label == field.LABEL_REPEATED:
                label = "repeated "
            elif field.proto3_optional:
                label = "optional "
            text = f"{label}{typed} {field.name} = {field.number}"
        options = self.field_options(field)
        return f"{text}{options};"

    def field_options(self, field: descriptor_pb2.FieldDescriptorProto) -> str:
        written: list[str] = []
        for option, value in field.options.ListFields():
            if option.is_extension and option.full_name == "google.api.field_behavior":
                written += [
                    f"(google.api.field_behavior) = {field_behavior_pb2.FieldBehavior.Name(b)}"
                    for b in value
                ]
            elif not option.is_extension:
                written.append(f"{option.name} = {_scalar(value)}")
            else:
                raise SystemExit(f"a2a-proto: field option {option.full_name} is not written")
        return f" [{', '.join(written)}]" if written else ""

    def enum(self, enum: descriptor_pb2.EnumDescriptorProto, depth: int) -> None:
        self.line(depth, f"enum {enum.name} {{")
        for option, value in enum.options.ListFields():
            self.line(depth + 1, f"option {option.name} = {_scalar(value)};")
        for value in enum.value:
            options = ""
            if value.options.ListFields():
                options = (
                    " ["
                    + ", ".join(f"{o.name} = {_scalar(v)}" for o, v in value.options.ListFields())
                    + "]"
                )
            self.line(depth + 1, f"{value.name} = {value.number}{options};")
        self.line(depth, "}")


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return str(value)


HEADER = """\
// A2A (Agent2Agent) v1: the contract of the pinned a2a-sdk, vendored.
//
// Written by scripts/a2a-proto.py from the descriptor a2a-sdk embeds
// (a2a.types.a2a_pb2); `make contracts` checks that it still matches the SDK
// (scripts/a2a-proto.py --check). Do not edit: upgrade the SDK and write it again.
// Upstream, with its comments: specification/a2a.proto in github.com/a2aproject/A2A
// (Apache-2.0, the Linux Foundation's A2A project).

"""


def render() -> str:
    return HEADER + _Writer(sdk_descriptor().package).file(sdk_descriptor())


def compile_vendored(path: Path) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto protoc makes of the vendored file."""
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "a2a.binpb"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{path.parent}",
                f"-I{THIRD_PARTY}",
                f"-I{wkt}",
                f"--descriptor_set_out={out}",
                path.name,
            ],
            check=False,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"a2a-proto: protoc failed on {path}:\n{done.stderr}")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return _parsed(files[-1].SerializeToString())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if it does not match the SDK")
    args = parser.parse_args()
    if not args.check:
        VENDORED.parent.mkdir(parents=True, exist_ok=True)
        VENDORED.write_text(render())
    vendored = compile_vendored(VENDORED)
    expected = sdk_descriptor()
    if vendored != expected:
        diff = difflib.unified_diff(
            text_format.MessageToString(expected).splitlines(),
            text_format.MessageToString(vendored).splitlines(),
            "a2a-sdk's descriptor",
            str(VENDORED.relative_to(ROOT)),
            lineterm="",
        )
        sys.exit(
            "a2a-proto: the vendored A2A contract differs from the pinned SDK's; "
            "run `python scripts/a2a-proto.py`:\n" + "\n".join(list(diff)[:80])
        )
    print(f"a2a-proto: {VENDORED.relative_to(ROOT)} matches a2a-sdk's descriptor")


if __name__ == "__main__":
    main()
