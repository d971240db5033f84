"""safetensors read/write (src/io/safetensors.c) and the strict JSON parser (src/io/json.c),
driven through build/tests/stcheck and checked against tests/common.py's independent Python
implementation of the format, Python's json module and PyTorch."""
import json, os, resource, signal, struct, subprocess
import torch
from common import BUILD, st_load, st_save, tmpdir

STCHECK = os.path.join(BUILD, "tests", "stcheck")


def stcheck(*args, rc=0, preexec_fn=None):
    """Runs stcheck ARGS (str or bytes); asserts the exit code; returns (stdout, stderr)."""
    p = subprocess.run([STCHECK] + [a if isinstance(a, bytes) else str(a) for a in args],
                       capture_output=True, timeout=300, preexec_fn=preexec_fn)
    out, err = p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")
    if p.returncode != rc:
        raise AssertionError(f"stcheck {args}: exit {p.returncode}, wanted {rc}; "
                             f"stderr: {err.strip()[-1500:]}")
    return out, err


def assert_one_line_error(err, path, *wanted):
    """The message is one line 'stcheck: PATH: ...' that contains every wanted piece."""
    assert err.count("\n") == 1 and err.endswith("\n"), f"wanted one line, got {err!r}"
    lines = err.split("\n")[:-1]
    assert lines[0].startswith(f"stcheck: {path}: "), f"does not name {path}: {lines[0]!r}"
    for w in wanted:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"


def parse_info(out):
    """stcheck info output -> ([(name, dtype, shape, nbytes)], {key: value})."""
    dec = json.JSONDecoder()
    tensors, meta = [], {}
    for line in out.split("\n")[:-1]:   # not splitlines(): U+2028 is not a line end here
        kind, rest = line.split(" ", 1)
        if kind == "tensor":
            name, end = dec.raw_decode(rest)
            dtype, shape, nbytes = rest[end:].split()
            tensors.append((name, dtype, json.loads(shape), int(nbytes)))
        else:
            assert kind == "meta", line
            key, end = dec.raw_decode(rest)
            meta[key] = dec.raw_decode(rest[end:].lstrip())[0]
    return tensors, meta


def assert_same_tensors(got, ref):
    assert list(got) == list(ref), f"names/order {list(got)[:5]} != {list(ref)[:5]}"
    for k in ref:
        a, b = got[k], ref[k]
        assert a.dtype == b.dtype and a.shape == b.shape, f"{k}: {a.dtype}{tuple(a.shape)} " \
            f"!= {b.dtype}{tuple(b.shape)}"
        # Bytes, not values: NaN payloads and -0.0 must survive too.
        assert a.contiguous().numpy().tobytes() == b.contiguous().numpy().tobytes(), k


def check_layout(path, names):
    """A file written by incept: header padded with spaces to 8, tensors packed in order."""
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0, f"header length {n} not a multiple of 8"
    text = data[8:8 + n].decode("utf-8")
    assert text.rstrip(" ").endswith("}") and text.lstrip().startswith("{")
    header = json.loads(text)
    header.pop("__metadata__", None)
    assert list(header) == names, "tensors not written in the given order"
    off = 0
    for name in names:
        b, e = header[name]["data_offsets"]
        assert b == off, f"{name}: begins at {b}, wanted {off}"
        off = e
    assert 8 + n + off == len(data), "file longer or shorter than header + data"


META = {"plain": "value", "quote\"key": "back\\slash \"quoted\"",
        "unicode": "é 中文 😀 \u2028", "ctrl": "tab\tnl\ncr\r\x01\x1f", "empty": ""}


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1e-45, 3.5])
    return {
        "f32.matrix": torch.randn(3, 4, generator=g),
        "f32.scalar": torch.tensor(2.5),
        "f32.empty": torch.zeros(0, 5),
        "f32.4d": torch.randn(2, 3, 4, 5, generator=g),
        "f32.special": special,
        "i64.counts": torch.tensor([0, -1, 2**62, -2**63, 2**63 - 1], dtype=torch.int64),
        "i64.scalar": torch.tensor(7, dtype=torch.int64),
        "f64.v": torch.randn(6, dtype=torch.float64, generator=g),
        "i32.v": torch.tensor([1, -2, 2**31 - 1], dtype=torch.int32),
        "u8.img": torch.randint(0, 256, (2, 3, 3), dtype=torch.uint8, generator=g),
        "f16.v": torch.randn(5, generator=g).half(),
        "f32.8d": torch.randn(1, 2, 1, 2, 1, 2, 1, 2, generator=g),
        "name with spaces/and.dots \"q\" é": torch.ones(2),
    }


def test_roundtrip_python_c_python():
    d = tmpdir()
    src, out = os.path.join(d, "py.safetensors"), os.path.join(d, "c.safetensors")
    ref = sample_tensors()
    st_save(src, ref, META)
    # Python-written -> incept reads: names, dtypes, shapes, sizes and metadata as written.
    info, meta = parse_info(stcheck("info", src)[0])
    want = [(k, {torch.float32: "F32", torch.int64: "I64", torch.float64: "F64",
                 torch.int32: "I32", torch.uint8: "U8", torch.float16: "F16"}[t.dtype],
             list(t.shape), t.numel() * t.element_size()) for k, t in ref.items()]
    assert info == want, f"{info} != {want}"
    assert meta == META, f"{meta} != {META}"
    # incept-written -> Python reads it back bit for bit.
    stcheck("copy", src, out)
    got, got_meta = st_load(out, with_meta=True)
    assert_same_tensors(got, ref)
    assert got_meta == META
    check_layout(out, list(ref))
    # And incept reads its own output the same way (a second copy is byte-identical).
    out2 = os.path.join(d, "c2.safetensors")
    stcheck("copy", out, out2)
    assert open(out, "rb").read() == open(out2, "rb").read()
    assert not [f for f in os.listdir(d) if ".tmp." in f], os.listdir(d)


def test_raw_utf8_header_and_no_metadata():
    """Headers written with raw UTF-8 (ensure_ascii=False), no metadata, no padding."""
    d = tmpdir()
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    header = {"größe 中 😀": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "none": {"shape": [0], "data_offsets": [24, 24], "dtype": "I64"}}
    h = json.dumps(header, ensure_ascii=False).encode()
    src = os.path.join(d, "raw.st")
    with open(src, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + t.numpy().tobytes())
    info, meta = parse_info(stcheck("info", src)[0])
    assert info == [("größe 中 😀", "F32", [2, 3], 24), ("none", "I64", [0], 0)] and meta == {}
    out = os.path.join(d, "out.st")
    stcheck("copy", src, out)
    got = st_load(out)
    assert torch.equal(got["größe 中 😀"], t) and got["none"].shape == (0,)
    assert got["none"].dtype == torch.int64
    check_layout(out, list(header))


def test_empty_file_roundtrip():
    """No tensors at all ({} header) is a valid file."""
    d = tmpdir()
    src, out = os.path.join(d, "e.st"), os.path.join(d, "e2.st")
    st_save(src, {})
    assert stcheck("info", src)[0] == ""
    stcheck("copy", src, out)
    assert st_load(out) == {}


def test_googlenet_state_dict_roundtrip():
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    sd = model.state_dict()
    assert any(v.dtype == torch.int64 for v in sd.values())   # num_batches_tracked
    d = tmpdir()
    src, out = os.path.join(d, "googlenet.safetensors"), os.path.join(d, "copy.safetensors")
    st_save(src, sd, {"arch": "googlenet", "aux_logits": "true"})
    stcheck("copy", src, out)
    got, meta = st_load(out, with_meta=True)
    assert meta == {"arch": "googlenet", "aux_logits": "true"}
    assert_same_tensors(got, {k: v for k, v in sd.items()})
    check_layout(out, list(sd))
    fresh = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    fresh.load_state_dict(got, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k


def raw_file(path, header, data=b"", hlen=None):
    """Writes a safetensors-like file; header may be a dict or raw str/bytes text."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if hlen is None else hlen
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + header + data)


def t_(dtype="F32", shape=(2,), off=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(off)}


def test_bad_files_rejected_with_clear_message():
    d = tmpdir()
    good = os.path.join(d, "good.st")
    st_save(good, {"a": torch.ones(2, 3), "b": torch.arange(4)})
    good_bytes = open(good, "rb").read()

    def bytes_file(b):
        return lambda p: open(p, "wb").write(b)

    cases = [
        # (file name, writer, wanted pieces of the message)
        ("empty.st", bytes_file(b""), ["empty file"]),
        ("short.st", bytes_file(b"\x01\x02\x03"), ["3 bytes", "too short"]),
        ("truncated.st", bytes_file(good_bytes[:-4]),
         ["tensor 'b'", "run past the end of the data section", "truncated"]),
        ("hlen_past_end.st", lambda p: raw_file(p, "{}", hlen=1000),
         ["header length 1000 runs past the end of the file"]),
        ("hlen_absurd.st", lambda p: raw_file(p, "{}", hlen=2**63 + 5), ["absurd"]),
        ("hlen_truncated.st", bytes_file(good_bytes[:20]), ["runs past the end of the file"]),
        ("overlap.st", lambda p: raw_file(p, {"a": t_(off=(0, 8)), "b": t_(off=(4, 12))},
                                          b"\0" * 12),
         ["tensor 'b'", "overlap tensor 'a'", "[4, 12]"]),
        ("overlap_same.st", lambda p: raw_file(p, {"a": t_(), "b": t_()}, b"\0" * 8),
         ["overlap"]),
        ("out_of_range.st", lambda p: raw_file(p, {"a": t_(off=(0, 8)), "b": t_(off=(8, 16))},
                                               b"\0" * 12),
         ["tensor 'b'", "[8, 16]", "run past the end of the data section (12 bytes)"]),
        ("gap.st", lambda p: raw_file(p, {"a": t_(off=(0, 8)), "b": t_(off=(12, 20))},
                                      b"\0" * 20),
         ["tensor 'b'", "leave bytes [8, 12)", "unused"]),
        ("trailing_data.st", lambda p: raw_file(p, {"a": t_()}, b"\0" * 16),
         ["data section has 16 bytes", "cover only 8"]),
        ("dtype.st", lambda p: raw_file(p, {"a": t_(dtype="F33")}, b"\0" * 8),
         ["tensor 'a'", "unknown dtype string 'F33'", "known: F32"]),
        ("dtype_type.st", lambda p: raw_file(p, {"a": t_(dtype=4)}, b"\0" * 8),
         ["tensor 'a'", "dtype must be a string, found 4"]),
        ("overflow.st", lambda p: raw_file(p, {"w": t_(shape=(2**32, 2**32, 2), off=(0, 0))}),
         ["tensor 'w'", "[4294967296,4294967296,2]", "overflows"]),
        ("overflow_bytes.st", lambda p: raw_file(p, {"w": t_(shape=(2**62, 2), off=(0, 0))}),
         ["tensor 'w'", "overflows"]),
        ("negative_dim.st", lambda p: raw_file(p, {"a": t_(shape=(2, -1))}, b"\0" * 8),
         ["tensor 'a'", "shape[1] must be a non-negative integer, found -1"]),
        ("float_dim.st", lambda p: raw_file(p, {"a": t_(shape=(2.0,))}, b"\0" * 8),
         ["tensor 'a'", "shape[0] must be a non-negative integer, found number"]),
        ("shape_type.st", lambda p: raw_file(p, {"a": t_() | {"shape": "2"}}, b"\0" * 8),
         ["tensor 'a'", "shape must be an array"]),
        ("ndim.st", lambda p: raw_file(p, {"a": t_(shape=[1] * 9, off=(0, 4))}, b"\0" * 4),
         ["tensor 'a'", "9 dimensions, at most 8"]),
        ("size_mismatch.st", lambda p: raw_file(p, {"a": t_(shape=(2, 2), off=(0, 12))},
                                                b"\0" * 12),
         ["tensor 'a'", "[0, 12] hold 12 bytes but F32 [2,2] needs 16"]),
        ("begin_after_end.st", lambda p: raw_file(p, {"a": t_(off=(8, 0))}, b"\0" * 8),
         ["tensor 'a'", "begin is after end"]),
        ("offsets_arity.st", lambda p: raw_file(p, {"a": t_(off=(0,))}, b"\0" * 8),
         ["tensor 'a'", "data_offsets must be [begin, end]"]),
        ("offsets_negative.st", lambda p: raw_file(p, {"a": t_(off=(-8, 0))}, b"\0" * 8),
         ["tensor 'a'", "data_offsets must be [begin, end]"]),
        ("missing.st", lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
         ["tensor 'a'", "missing field 'data_offsets'"]),
        ("extra.st", lambda p: raw_file(p, {"a": t_() | {"strides": [1]}}, b"\0" * 8),
         ["tensor 'a'", "unexpected field 'strides'"]),
        ("entry_type.st", lambda p: raw_file(p, {"a": [1, 2]}), ["tensor 'a'", "found array"]),
        ("malformed.st", lambda p: raw_file(p, '{"a": {"dtype": "F32",}}', b"\0" * 8),
         ["header is not valid JSON", "byte 22", "expected a string key"]),
        ("trailing_garbage.st", lambda p: raw_file(p, '{}  x'), ["trailing characters", "'x'"]),
        ("nul_padding.st", lambda p: raw_file(p, '{}\0\0\0\0\0\0'), ["trailing characters"]),
        ("not_object.st", lambda p: raw_file(p, '[]'), ["header must be a JSON object, found array"]),
        ("empty_header.st", lambda p: raw_file(p, ''), ["not valid JSON", "end of input"]),
        ("duplicate.st", lambda p: raw_file(
            p, '{"conv.w":' + json.dumps(t_()) + ',"conv.w":' + json.dumps(t_()) + '}',
            b"\0" * 8), ["duplicate key 'conv.w'"]),
        ("bad_utf8.st", lambda p: raw_file(p, b'{"a\xff": ' + json.dumps(t_()).encode() + b'}',
                                           b"\0" * 8), ["not valid UTF-8"]),
        ("surrogate.st", lambda p: raw_file(p, '{"\\ud800x": ' + json.dumps(t_()) + '}',
                                            b"\0" * 8), ["lone high surrogate"]),
        ("nul_name.st", lambda p: raw_file(p, {"a\0b": t_()}, b"\0" * 8),
         ["tensor 'a\\x00b'", "NUL"]),
        ("meta_value.st", lambda p: raw_file(p, {"__metadata__": {"epoch": 3}}),
         ["__metadata__ key 'epoch'", "must be a string, found 3"]),
        ("meta_type.st", lambda p: raw_file(p, {"__metadata__": ["x"]}),
         ["__metadata__ must be an object", "found array"]),
        ("newline_name.st", lambda p: raw_file(p, {"bad\nname": t_(dtype="X")}, b"\0" * 8),
         ["tensor 'bad\\x0Aname'", "unknown dtype"]),
    ]
    for fname, write, wanted in cases:
        p = os.path.join(d, fname)
        write(p)
        for cmd in (["info", p], ["copy", p, os.path.join(d, "never.st")]):
            _, err = stcheck(*cmd, rc=1)
            try:
                assert_one_line_error(err, p, *wanted)
            except AssertionError as e:
                raise AssertionError(f"{fname}: {e}") from None
        assert not os.path.exists(os.path.join(d, "never.st"))
    # Not a file at all.
    _, err = stcheck("info", d, rc=1)
    assert_one_line_error(err, d, "not a regular file")
    _, err = stcheck("info", os.path.join(d, "absent.st"), rc=1)
    assert_one_line_error(err, os.path.join(d, "absent.st"), "cannot open",
                          "No such file or directory")


def leftovers(d):
    return sorted(f for f in os.listdir(d) if ".tmp." in f)


def test_failed_write_leaves_nothing():
    d = tmpdir()
    src = os.path.join(d, "src.st")
    st_save(src, {"w": torch.randn(64, 1024)}, {"k": "v"})   # 256 KiB of data
    # Into a directory that does not exist.
    out = os.path.join(d, "nope", "out.st")
    _, err = stcheck("copy", src, out, rc=1)
    assert_one_line_error(err, out, "cannot create temporary file", "No such file or directory")
    assert not os.path.exists(os.path.dirname(out))
    # Over a directory: the temp file is written, the rename fails, the temp file must go.
    out = os.path.join(d, "adir")
    os.mkdir(out)
    _, err = stcheck("copy", src, out, rc=1)
    assert_one_line_error(err, out, "cannot rename temporary file", "into place")
    assert os.path.isdir(out) and not leftovers(d), leftovers(d)
    # A write that fails half way (file size limit, EFBIG): the old file must stay as it was.
    out = os.path.join(d, "existing.st")
    with open(out, "wb") as f:
        f.write(b"old contents")

    def small_fsize():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # get EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    _, err = stcheck("copy", src, out, rc=1, preexec_fn=small_fsize)
    assert_one_line_error(err, out, "write error on temporary file", "left unchanged")
    assert open(out, "rb").read() == b"old contents" and not leftovers(d), leftovers(d)
    # A read-only directory (meaningless for root, who may write anyway).
    if os.geteuid() != 0:
        ro = os.path.join(d, "ro")
        os.mkdir(ro)
        os.chmod(ro, 0o555)
        try:
            _, err = stcheck("copy", src, os.path.join(ro, "out.st"), rc=1)
            assert_one_line_error(err, os.path.join(ro, "out.st"), "Permission denied")
            assert os.listdir(ro) == []
        finally:
            os.chmod(ro, 0o755)
    # A successful write replaces the old file completely.
    stcheck("copy", src, out)
    assert torch.equal(st_load(out)["w"], st_load(src)["w"]) and not leftovers(d)


def test_write_rejects_bad_names():
    d = tmpdir()
    src = os.path.join(d, "src.st")
    st_save(src, {"a": torch.ones(2), "b": torch.zeros(3)})
    out = os.path.join(d, "out.st")
    for new, wanted in [("a", "tensor 'a' given twice"),
                        ("__metadata__", "name is reserved for metadata"),
                        (b"bad\xffname", "not valid UTF-8")]:
        _, err = stcheck("rename", src, out, "b", new, rc=1)
        assert_one_line_error(err, out, wanted)
        assert not os.path.exists(out) and not leftovers(d)
    # Escaping on write: a name needing every kind of escape comes back intact.
    weird = "q\"b\\s/\t\n\x01\x7f é😀"
    stcheck("rename", src, out, "b", weird)
    assert list(st_load(out)) == ["a", weird]


JSON_VALID = [
    '{"a":[1,-2,0,9223372036854775807,-9223372036854775808],"b":"x\\"y\\\\z\\/\\b\\f\\n\\r\\t"}',
    '{"c":"\\u00e9\\u4E2D\\ud83d\\ude00\\u0000\\u001f","d":true,"e":false,"f":null}',
    '{"g":1.5e3,"h":-0.25,"i":{},"j":[],"k":[[[]]]," ":"","l":1E+2,"m":0.1,"n":-0e0}',
    ' \t\n\r{ "a" : 1 , "b" : [ 1 , 2 ] } \n',
    '42', '"s"', 'null', '-0', '[1e-300, 2.5E-3, 123456789012345678e-5]',
    '"raw utf-8: héllo 中 😀 \u2028"',
    '[' * 64 + ']' * 64,
    '{"a":{"a":{"a":1}},"b":{"a":2}}',     # the same key in different objects is fine
]

JSON_INVALID = [
    ('', "byte 0: expected a value, found end of input"),
    ('{', "expected a string key in object, found end of input"),
    ('{"a":1,}', "byte 7: expected a string key in object, found '}'"),
    ('[1,]', "byte 3: expected a value, found ']'"),
    ('[1 2]', "byte 3: expected ',' or ']' in array, found '2'"),
    ('{"a" 1}', "byte 5: expected ':' after object key"),
    ('{"a":1 "b":2}', "expected ',' or '}' after object member"),
    ('01', "leading zeros"), ('1.', "expected a digit after '.'"), ('.5', "expected a value"),
    ('1e', "expected a digit in exponent"), ('-', "expected a digit"), ('+1', "expected a value"),
    ('NaN', "expected a value"), ('Infinity', "expected a value"), ('tru', "expected a value"),
    ('"abc', "unterminated string"), ('"a\\', "unterminated string"),
    ('"a\x01b"', "raw control character 0x01"), ('"a\nb"', "raw control character 0x0A"),
    ('"\\x"', "invalid escape in string, found 'x'"), ('"\\u12"', "4 hex digits"),
    ('"\\u12g4"', "4 hex digits"),
    ('"\\ud800"', "lone high surrogate \\uD800"), ('"\\udc00"', "lone low surrogate \\uDC00"),
    ('"\\ud800\\u0041"', "lone high surrogate"),
    (b'"\xff"', "not valid UTF-8"), (b'"\xc0\xaf"', "not valid UTF-8"),
    (b'"\xed\xa0\x80"', "not valid UTF-8"), (b'"\xf4\x90\x80\x80"', "not valid UTF-8"),
    (b'"\xe4\xb8"', "not valid UTF-8"),
    ('{"a":1,"b":2,"a":3}', "byte 17: duplicate key 'a' in object"),
    ('9223372036854775808', "does not fit in 64 bits"),
    ('-9223372036854775809', "does not fit in 64 bits"),
    ('1e400', "out of double range"), ('{} {}', "trailing characters after the JSON value"),
    ('[' * 65 + ']' * 65, "nested deeper than 64 levels"),
    ('// c\n{}', "expected a value"), ("{'a':1}", "expected a string key"),
    ('\ufeff{}', "expected a value"),   # a UTF-8 byte-order mark is not JSON whitespace
]


def test_json_parser_against_python():
    d = tmpdir()
    p = os.path.join(d, "doc.json")
    for text in JSON_VALID:
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
        out = stcheck("json", p)[0]
        assert json.loads(out) == json.loads(text), f"{text!r}: {out!r}"
    for text, wanted in JSON_INVALID:
        raw = text if isinstance(text, bytes) else text.encode("utf-8")
        with open(p, "wb") as f:
            f.write(raw)
        _, err = stcheck("json", p, rc=1)
        assert_one_line_error(err, p, wanted)
