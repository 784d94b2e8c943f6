"""Odd paths and queries on GET/HEAD, on one keep-alive connection: /view with every combination of
filename/subfolder/type/preview/channel (real images, a truncated PNG, a text file, an HTML file in the
input folder), /object_info/<x>, /history/<x> and its paging, /models/<x>, /view_metadata/<x> (a valid, a
truncated and a garbage .safetensors), /internal/files/<x>, traversal attempts and very long paths."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import strategies as st

from . import support

EXAMPLES = 2600  # each example sends 1-4 requests
TIME_LIMIT_S = 60

FILENAMES = ["fuzz.png", "gray.png", "palette.png", "photo.jpg", "deep.png", "broken.png", "notes.txt", "page.html",
             "warm.png", "fuzz.png [input]", "fuzz.png [output]", "fuzz.png [temp]", "../fuzz.png", "/etc/passwd",
             "sub/fuzz.png", "", ".", "..", "fuzz.png\x00.txt", "a" * 5000, "CON", "fuzz.PNG", " [input]",
             "..\\..\\fuzz.png", "fuzz.png/", "~/fuzz.png", "%2e%2e%2ffuzz.png", "\u4e2d.png"]
SUBFOLDERS = ["", "sub", "../", "../../..", "/", "/etc", "sub/../..", "sub/../sub", "\x00", "a" * 300, "..%2f",
              "sub/", "./sub", "//", "..\\", "sub\x00"]
TYPES = ["input", "output", "temp", "", "INPUT", "../input", "input/..", "models", "\x00"]
PREVIEWS = ["webp", "jpeg", "webp;90", "jpeg;0", "jpeg;-5", "webp;101", "webp;99999999999999999999", "png;50", "gif",
            ";", "webp;", "jpeg;abc", "webp;1e3", "", "JPEG;95", "jpeg;95;1", "webp;-2147483649", "jpeg;100"]
CHANNELS = ["rgba", "rgb", "a", "", "A", "rgbx", "aaaa", "r"]
SAFETENSORS = ["tiny.safetensors", "truncated.safetensors", "garbage.safetensors", "missing.safetensors",
               "../tiny.safetensors", "tiny.ckpt", "", "/etc/passwd.safetensors", "sub/../tiny.safetensors"]
FOLDERS = ["checkpoints", "loras", "vae", "clip", "unet", "custom_nodes", "configs", "", "..", "nope", "CHECKPOINTS"]
PLAIN_PATHS = ["/", "/health", "/ready", "/metrics", "/system_stats", "/features", "/prompt", "/queue", "/history",
               "/object_info", "/embeddings", "/extensions", "/models", "/internal/folder_paths", "/api/features",
               "/api", "/api/", "/api/api/queue", "/internal", "/internal/", "/internal/files", "/internal/logs",
               "/ws", "/api/ws", "/view", "/view_metadata", "/upload/image", "/userdata", "/settings", "/i18n",
               "/favicon.ico", "/index.html", "/x.js", "/x.png", "/index.json"]
TRAVERSALS = ["/internal/files/..%2F..%2F", "/view_metadata/..%2F..%2Fetc?filename=passwd.safetensors",
              "/models/..%2f..", "/models/%2e%2e", "/object_info/..%2F..%2F", "/history/..%2f..%2fetc%2fpasswd",
              "/internal/files/%2e%2e", "/api/../health", "/%2e%2e/%2e%2e/etc/passwd", "/view/../../etc/passwd",
              "/internal/files/input/../../..", "/models/checkpoints/../../../etc"]


def q(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


texts = st.one_of(st.text(max_size=30), st.binary(max_size=20).map(lambda b: b.decode("latin-1")))
segments = st.one_of(st.sampled_from(["Number", "Record", "KSampler", "", "..", "%00", "%2F", "x" * 2000, "Number ",
                                      "nUMBER", "\u00e9", "a b"]).map(q), texts.map(q))


def pick(pool):
    return st.one_of(st.sampled_from(pool), texts)


@st.composite
def view_target(draw) -> str:
    params = []
    for name, pool in (("filename", FILENAMES), ("subfolder", SUBFOLDERS), ("type", TYPES), ("preview", PREVIEWS),
                       ("channel", CHANNELS)):
        if draw(st.integers(0, 9)) < (9 if name == "filename" else 5):
            params.append(f"{name}={q(draw(pick(pool)))}")
    if draw(st.integers(0, 9)) == 0:
        params.append(f"filename={q(draw(pick(FILENAMES)))}")  # a repeated parameter
    if draw(st.integers(0, 9)) == 0:
        params.append(draw(st.sampled_from(["filename", "=x", "&&", "filename=%", "filename=%zz", "preview"])))
    return ("/api/view?" if draw(st.integers(0, 4)) == 0 else "/view?") + "&".join(params)


@st.composite
def history_target(draw) -> str:
    if draw(st.booleans()):
        return "/history/" + draw(segments)
    params = []
    for name in ("max_items", "offset"):
        if draw(st.booleans()):
            value = draw(st.one_of(st.integers(-10 ** 20, 10 ** 20).map(str),
                                   st.sampled_from(["", "abc", "1.5", " 3 ", "+1", "-0", "1_000", "\u0661", "1e3",
                                                    "9" * 5000, "NaN"]), texts))
            params.append(f"{name}={q(value)}")
    return "/history?" + "&".join(params)


targets = st.one_of(
    view_target(), view_target(), view_target(),
    history_target(),
    st.builds(lambda s: "/object_info/" + s, segments),
    st.builds(lambda s: "/api/object_info/" + s, segments),
    st.builds(lambda s: "/models/" + s, st.one_of(st.sampled_from(FOLDERS).map(q), segments)),
    st.builds(lambda f, n: f"/view_metadata/{f}?filename={n}", st.one_of(st.sampled_from(FOLDERS).map(q), segments),
              st.one_of(st.sampled_from(SAFETENSORS).map(q), texts.map(q))),
    st.builds(lambda f: "/view_metadata/" + f, st.sampled_from(FOLDERS)),
    st.builds(lambda s: "/internal/files/" + s, st.one_of(st.sampled_from(TYPES).map(q), segments)),
    st.sampled_from(PLAIN_PATHS), st.sampled_from(TRAVERSALS),
    st.builds(lambda n, part: "/" + part * n, st.sampled_from([100, 1000, 5000, 20000]),
              st.sampled_from(["a/", "%2e%2e/", "x", "%00", "../"])),
    st.builds(lambda raw: "/" + "".join(f"%{b:02X}" for b in raw), st.binary(max_size=50)),
    st.builds(lambda p, s: p + "?" + s, st.sampled_from(PLAIN_PATHS), texts.map(q)),
)
requests_ = st.tuples(st.sampled_from(["GET"] * 9 + ["HEAD"]), targets)


@pytest.mark.slow
def test_odd_paths_and_queries_never_break_the_server(fuzz_server):
    tally = support.new_tally("odd-paths", fuzz_server)
    client = support.KeepAlive(fuzz_server.port)

    def handle(batch) -> None:
        for method, target in batch:
            tally.sent += 1
            result = client.request(method, target)
            tally.keepalive_result(result, f"{method} {support.show(target, 200)}")

    support.fuzz(tally, st.lists(requests_, min_size=1, max_size=4), handle, examples=EXAMPLES,
                 time_limit_s=TIME_LIMIT_S)
    tally.connections = client.connections
    client.close()
    problems = tally.finish()
    assert not problems, "\n".join(problems)
