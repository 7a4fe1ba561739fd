"""Profile records -> an OTLP ExportProfilesServiceRequest (profiles
v1development): one shared dictionary with every table deduplicated; index 0
of each table is the empty entry, as the protocol reserves it."""
from __future__ import annotations

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import ExportProfilesServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.profiles.v1development import profiles_pb2 as pb
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource

from .. import __version__

KERNEL_MAPPING = "[kernel.kallsyms]"
BUILD_ID_ATTR = "process.executable.build_id.gnu"
FRAME_TYPE_ATTR = "profile.frame.type"


def _any(v) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    return AnyValue(string_value=str(v))


class _Dictionary:
    def __init__(self):
        self.d = pb.ProfilesDictionary()
        self._idx: dict = {}
        self.d.string_table.append("")
        self.d.mapping_table.add()
        self.d.location_table.add()
        self.d.function_table.add()
        self.d.link_table.add()
        self.d.attribute_table.add()
        self.d.stack_table.add()

    def _intern(self, kind: str, key, make) -> int:
        k = (kind, key)
        i = self._idx.get(k)
        if i is None:
            i = self._idx[k] = make()
        return i

    def string(self, s: str) -> int:
        def make():
            self.d.string_table.append(s)
            return len(self.d.string_table) - 1
        return 0 if not s else self._intern("s", s, make)

    def attribute(self, key: str, value) -> int:
        def make():
            self.d.attribute_table.add(key_strindex=self.string(key), value=_any(value))
            return len(self.d.attribute_table) - 1
        return self._intern("a", (key, value), make)

    def mapping(self, m) -> int:
        if m is None:
            return 0

        def make():
            attrs = [self.attribute(BUILD_ID_ATTR, m.build_id)] if getattr(m, "build_id", None) else []
            self.d.mapping_table.add(memory_start=m.start, memory_limit=m.end, file_offset=m.file_offset,
                                     filename_strindex=self.string(m.path), attribute_indices=attrs)
            return len(self.d.mapping_table) - 1
        return self._intern("m", (m.start, m.end, m.file_offset, m.path), make)

    def kernel_mapping(self) -> int:
        def make():
            self.d.mapping_table.add(filename_strindex=self.string(KERNEL_MAPPING))
            return len(self.d.mapping_table) - 1
        return self._intern("m", KERNEL_MAPPING, make)

    def function(self, name: str, filename: str) -> int:
        def make():
            self.d.function_table.add(name_strindex=self.string(name), system_name_strindex=self.string(name),
                                      filename_strindex=self.string(filename))
            return len(self.d.function_table) - 1
        return self._intern("f", (name, filename), make)

    def location(self, f) -> int:
        mapping_idx = self.kernel_mapping() if f.kernel else self.mapping(f.mapping)
        # an interpreted frame (Python...) has no machine address: its
        # location is its function, source file and line, and its frame type
        address = 0 if f.frame_type else f.address

        def make():
            attrs = [self.attribute(FRAME_TYPE_ATTR, f.frame_type)] if f.frame_type else []
            loc = self.d.location_table.add(mapping_index=mapping_idx, address=address, attribute_indices=attrs)
            if f.function:
                if f.file is not None:
                    filename = f.file
                else:
                    filename = KERNEL_MAPPING if f.kernel else (f.mapping.path if f.mapping else "")
                loc.lines.add(function_index=self.function(f.function, filename), line=f.line)
            return len(self.d.location_table) - 1
        return self._intern("l", (mapping_idx, address, f.function, f.file, f.line, f.frame_type), make)

    def link(self, link) -> int:
        """The link_table index of a sample's (trace_id, span_id); 0: none.
        Ids are big-endian, as the trace exporter writes a span's."""
        if link is None:
            return 0

        def make():
            trace_id, span_id = link
            self.d.link_table.add(trace_id=trace_id.to_bytes(16, "big"), span_id=span_id.to_bytes(8, "big"))
            return len(self.d.link_table) - 1
        return self._intern("n", link, make)

    def stack(self, frames) -> int:
        locs = tuple(self.location(f) for f in frames)

        def make():
            self.d.stack_table.add(location_indices=locs)
            return len(self.d.stack_table) - 1
        return self._intern("k", locs, make)


def build_request(resource, scopes: dict) -> ExportProfilesServiceRequest:
    """resource: an SDK Resource; scopes: scope name -> [records.Profile]."""
    dic = _Dictionary()
    req = ExportProfilesServiceRequest()
    rp = req.resource_profiles.add()
    rp.resource.CopyFrom(PbResource(attributes=[KeyValue(key=k, value=_any(v))
                                                for k, v in resource.attributes.items()]))
    for scope_name, profiles in scopes.items():
        if not profiles:
            continue
        sp = rp.scope_profiles.add(scope=InstrumentationScope(name=scope_name, version=__version__))
        for prof in profiles:
            p = sp.profiles.add(time_unix_nano=prof.start_time_ns, duration_nano=prof.duration_ns,
                                period=prof.period_ns)
            p.sample_type.type_strindex = dic.string(prof.sample_type[0])
            p.sample_type.unit_strindex = dic.string(prof.sample_type[1])
            p.period_type.type_strindex = dic.string(prof.period_type[0])
            p.period_type.unit_strindex = dic.string(prof.period_type[1])
            for s in prof.samples:
                p.samples.add(stack_index=dic.stack(s.frames), values=[s.count], link_index=dic.link(s.link),
                              attribute_indices=[dic.attribute(k, v) for k, v in sorted(s.attributes.items())])
    req.dictionary.CopyFrom(dic.d)
    return req
