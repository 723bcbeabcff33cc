"""Dollar caps on model calls in real Envoy (two workers, real OpenBao), driven by the vendors' own
unmodified SDKs (`openai`, `anthropic`) against an OpenAI-compatible and an Anthropic-compatible
vendor that answer with realistic usage, as JSON and as server-sent events.

Prices are in micro-dollars per million tokens (µUSD: 1 USD = 1,000,000), caps in µUSD, so a
credential capped at 5.00 USD carries `"lim": {"spend": 5000000}`. What got past the gateway is
priced here, independently, from the usage each answer reported."""
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai
import pytest
import requests

import envoy_config
import framing
import harness
from conftest import assert_no_leaks
from test_core import access_entries, raw_request
from test_observability import series

sys.path.insert(0, str(harness.ROOT / "scripts"))
import model_vendor  # noqa: E402

# µUSD per million tokens: an expensive model (so a 5 USD cap is reached in a few calls) and a cheap one.
PRICES = {"big-1": {"input": 150_000_000, "output": 600_000_000}, "mini-1": {"input": 150_000, "output": 600_000, "image_tokens": 3000}}
CLAUDE = {"claude-big": {"input": 150_000_000, "output": 600_000_000, "cached_input": 15_000_000, "cache_write": 187_500_000}}
OVERHEAD = 256
CAP = 5_000_000  # 5.00 USD
# A call to big-1 with max_tokens 400 and "hi" is bound at ~0.29 USD and costs ~0.24 USD: this much
# is room for two such calls whose usage is read, never for two whose whole bound is kept.
ROOM_FOR_ONE = 555_000


def ai_config() -> dict:
    cfg = envoy_config.filter_config()
    openai_secret = {"store": "bao", "path": "it/stripe", "field": "api_key"}
    cfg["targets"].update({
        "oai": {"credential": "bearer", "secret": openai_secret, "inject": {"type": "bearer"},
                "cost": {"usage": "openai", "models": PRICES, "max_tokens": 256, "input_overhead_tokens": OVERHEAD,
                         "free": ["GET /**"]},
                "refund_on": [429]},
        "claude": {"credential": "bearer", "secret": {"store": "bao", "path": "it/anthropic", "field": "api_key"},
                   "inject": {"type": "header", "name": "x-api-key"},
                   "cost": {"usage": "anthropic", "models": CLAUDE, "input_overhead_tokens": OVERHEAD}},
    })
    return cfg


def ai_bootstrap(ports, log) -> dict:
    b = envoy_config.bootstrap(ports, log, ai_config())
    for r in envoy_config.buffer_on(b, ("oai", "claude"), 1048576):
        r["route"]["timeout"] = "30s"
    return b


class AiGateway:
    def __init__(self, gw, workdir):
        self.gw = gw
        self.seen = []
        self.vendor_port = harness.free_port()
        self.vendor = model_vendor.serve(self.vendor_port, record=lambda *r: self.seen.append(r))
        self.ports = dict(gw.ports, admin=harness.free_port(), hardened=harness.free_port(), raw=harness.free_port(), vendor=self.vendor_port)
        self.access_log = workdir / "access-ai.log"
        self.envoy = harness.Envoy(workdir, ai_bootstrap(self.ports, self.access_log), gw.env, name="envoy-ai", concurrency=2)
        self.url = f"http://127.0.0.1:{self.ports['hardened']}"
        harness.wait_until(lambda: requests.get(self.url + "/keyward/health", timeout=5).status_code == 200, timeout=15, what="ready")

    def token(self, spend=CAP, **extra):
        c = harness.claims(["oai * /**", "claude * /**"], sub="agent/research", run="run-1", ttl=600, lim={"spend": spend}, **extra)
        return harness.mint(self.gw.k1, c), c["jti"]

    def openai(self, tok):
        return openai.OpenAI(api_key=tok, base_url=f"{self.url}/oai/v1", max_retries=0, timeout=20)

    def anthropic(self, tok):
        return anthropic.Anthropic(api_key=tok, base_url=f"{self.url}/claude", max_retries=0, timeout=20)

    def entries(self, jti, n=None):
        if n is not None:
            harness.wait_until(lambda: len(access_entries(self, jti)) >= n, timeout=10, what=f"{n} access-log entries")
        return access_entries(self, jti)

    def stop(self):
        self.envoy.stop()
        self.vendor.shutdown()


@pytest.fixture(scope="module")
def ai(gw, workdir):
    g = AiGateway(gw, workdir)
    yield g
    assert_no_leaks(g.envoy.log_path.read_text(errors="replace") + (g.access_log.read_text() if g.access_log.exists() else ""), "the AI gateway's logs")
    g.stop()


def price(prices: dict, inp: int, out: int, cached=0, written=0) -> int:
    """What a call costs, rounded up to a whole µUSD, computed here from the reported usage."""
    p = prices
    total = inp * p["input"] + out * p["output"] + cached * p.get("cached_input", p["input"]) + written * p.get("cache_write", 2 * p["input"])
    return math.ceil(total / 1_000_000)


def test_an_openai_call_through_the_sdk_is_charged_its_usage(ai):
    tok, jti = ai.token()
    r = ai.openai(tok).chat.completions.create(model="mini-1", max_tokens=50, messages=[{"role": "user", "content": "Say hello"}])
    assert r.choices[0].message.content.startswith("Hello")
    vendor = ai.seen[-1]
    assert vendor[2]["authorization"] == f"Bearer {ai.gw.s['stripe']}", "the vendor got the real key"
    assert vendor[2].get("accept-encoding") == "identity", "the answer is asked for uncompressed"
    (e,) = ai.entries(jti, 1)
    want = price(PRICES["mini-1"], r.usage.prompt_tokens, r.usage.completion_tokens)
    assert (e["decision"], e["model"], e["usage"], e["spend"]) == ("allow", "mini-1", "read", "reserved")
    assert (int(e["tokens_in"]), int(e["tokens_out"]), int(e["cost"])) == (r.usage.prompt_tokens, r.usage.completion_tokens, want)
    assert int(e["reserved"]) >= want
    text = ai.envoy.prometheus()
    assert series(text, "keyward_tokens_total").get(frozenset({("target", "oai"), ("model", "mini-1"), ("kind", "output")}), 0) >= 50
    assert series(text, "keyward_usage_cost_total").get(frozenset({("target", "oai"), ("model", "mini-1")}), 0) >= want


def test_concurrent_streamed_and_whole_calls_never_pass_a_5_usd_cap(ai):
    tok, jti = ai.token()
    oa, claude = ai.openai(tok), ai.anthropic(tok)
    prompt = [{"role": "user", "content": "Write a long poem about gateways."}]

    def one(i):
        try:
            kind = i % 4
            if kind == 0:
                r = oa.chat.completions.create(model="big-1", max_tokens=400, messages=prompt)
                return price(PRICES["big-1"], r.usage.prompt_tokens, r.usage.completion_tokens)
            if kind == 1:
                chunks = list(oa.chat.completions.create(model="big-1", max_tokens=400, messages=prompt, stream=True,
                                                         stream_options={"include_usage": True}))
                u = chunks[-1].usage
                return price(PRICES["big-1"], u.prompt_tokens, u.completion_tokens)
            if kind == 2:
                m = claude.messages.create(model="claude-big", max_tokens=400, messages=prompt)
                return price(CLAUDE["claude-big"], m.usage.input_tokens, m.usage.output_tokens)
            with claude.messages.stream(model="claude-big", max_tokens=400, messages=prompt) as s:
                m = s.get_final_message()
            return price(CLAUDE["claude-big"], m.usage.input_tokens, m.usage.output_tokens)
        except (openai.RateLimitError, anthropic.RateLimitError) as err:
            assert err.response.json()["error"] == "spend_exhausted"
            return None

    with ThreadPoolExecutor(24) as pool:
        first = list(pool.map(one, range(48)))
    charged = [c for c in first if c is not None]
    assert 0 < len(charged) < 48, "some calls fit the cap, the rest were refused"
    # Then one at a time until refused: the cap is used up to its last call.
    for i in range(48, 80):
        c = one(i)
        if c is None:
            break
        charged.append(c)
    else:
        pytest.fail("never refused")
    assert sum(charged) <= CAP, f"{sum(charged)} µUSD got past a cap of {CAP}"
    # Close to the cap: what is left is less than one more call's bound (~0.33 USD here).
    assert sum(charged) >= CAP - 400_000, sum(charged)
    es = [e for e in ai.entries(jti) if e["decision"] == "allow"]
    harness.wait_until(lambda: len([e for e in ai.entries(jti) if e["decision"] == "allow"]) >= len(charged), timeout=10, what="entries")
    es = [e for e in ai.entries(jti) if e["decision"] == "allow"]
    assert sorted(int(e["cost"]) for e in es) == sorted(charged), "the access log prices every call as computed here"
    assert all(e["usage"] == "read" for e in es)


def test_a_cut_stream_keeps_its_whole_reservation(ai):
    # Room for one call's bound and a little more: after a call whose usage is read, a second
    # fits; after a cut one, it does not.
    tok, jti = ai.token(spend=ROOM_FOR_ONE)
    oa = ai.openai(tok)
    with pytest.raises((openai.APIError, openai.APIConnectionError)):
        s = oa.chat.completions.create(model="big-1", max_tokens=400, messages=[{"role": "user", "content": "hi"}], stream=True,
                                       stream_options={"include_usage": True}, extra_headers={"x-test-vendor": "cut"})
        for _ in s:
            pass
        raise openai.APIError("the stream ended without an error", request=None, body=None)
    (e,) = ai.entries(jti, 1)
    assert e["usage"] == "unread" and int(e["cost"]) == int(e["reserved"])
    with pytest.raises(openai.RateLimitError):
        oa.chat.completions.create(model="big-1", max_tokens=400, messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("how", ["nousage", "gzip", "error", "cut"])
def test_an_answer_without_readable_usage_keeps_its_whole_reservation(ai, how):
    tok, jti = ai.token(spend=ROOM_FOR_ONE)
    oa = ai.openai(tok)
    try:
        oa.chat.completions.create(model="big-1", max_tokens=400, messages=[{"role": "user", "content": "hi"}], extra_headers={"x-test-vendor": how})
    except (openai.APIError, openai.APIConnectionError):
        pass
    (e,) = ai.entries(jti, 1)
    assert e["usage"] == "unread", e
    # The first call's whole bound (~0.28 USD) stays counted: a second of the same size does not
    # fit, on whichever worker a new connection lands.
    for _ in range(4):
        with pytest.raises(openai.RateLimitError):
            ai.openai(tok).chat.completions.create(model="big-1", max_tokens=400, messages=[{"role": "user", "content": "hi"}],
                                                   extra_headers={"connection": "close"})


def test_calls_the_gateway_cannot_bound_never_reach_the_vendor(ai):
    tok, jti = ai.token()
    oa, claude = ai.openai(tok), ai.anthropic(tok)
    before = len(ai.seen)
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="gpt-unlisted", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert e.value.response.json()["error"] == "bad_request"
    with pytest.raises(openai.BadRequestError) as e:
        list(oa.chat.completions.create(model="mini-1", max_tokens=5, messages=[{"role": "user", "content": "hi"}], stream=True,
                                        stream_options={"include_usage": False}))
    assert "include_usage" in e.value.response.json()["message"]
    with pytest.raises(openai.BadRequestError) as e:
        big_image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
        oa.chat.completions.create(model="big-1", max_tokens=5, messages=[{"role": "user", "content": [big_image]}])
    assert "image_tokens" in e.value.response.json()["message"]
    with pytest.raises(openai.BadRequestError):
        oa.responses.create(model="mini-1", max_output_tokens=5, input=[{"type": "item_reference", "id": "msg_1"}])
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model="mini-1", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://images.example/cat.png"}}]}])
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="claude-big", max_tokens=5, messages=[{"role": "user", "content": "hi"}],
                               tools=[{"type": "web_search_20250305", "name": "web_search"}])
    # A null limit (the model's own at the vendor), and the credential escaped into the body.
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model="mini-1", max_completion_tokens=None, messages=[{"role": "user", "content": "hi"}])
    sig = tok.rsplit(".", 1)[1]
    escaped = "".join(f"\\u{ord(c):04x}" for c in sig)
    raw = requests.post(f"{ai.url}/oai/v1/chat/completions", headers={"authorization": f"Bearer {tok}", "content-type": "application/json"},
                        data='{"model":"' + escaped + '","max_tokens":5,"messages":[]}', timeout=10)
    assert raw.status_code == 400 and "copy of the credential" in raw.json()["message"], raw.text
    # A request too expensive for what is left is refused whole, before the vendor.
    small, _ = ai.token(spend=1000)
    with pytest.raises(openai.RateLimitError) as e:
        ai.openai(small).chat.completions.create(model="big-1", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert e.value.response.json()["error"] == "spend_exhausted" and e.value.response.headers.get("retry-after")
    assert len(ai.seen) == before, "none of them reached the vendor"


def test_a_call_without_max_tokens_is_bounded_by_the_target_and_told_so(ai):
    """A call that states no output limit is reserved at the target's, and the limit is written
    into the call: the vendor would otherwise generate up to the model's own."""
    tok, jti = ai.token()
    r = ai.openai(tok).chat.completions.create(model="mini-1", messages=[{"role": "user", "content": "hi"}])
    (e,) = ai.entries(jti, 1)
    body = ai.seen[-1][3]
    assert json.loads(body)["max_completion_tokens"] == 256, body
    assert int(ai.seen[-1][2]["content-length"]) == len(body), "the new length"
    assert int(e["reserved"]) == math.ceil(256 * 600_000 / 1e6) + math.ceil((len(body) + OVERHEAD) * 150_000 / 1e6)
    assert int(e["cost"]) == price(PRICES["mini-1"], r.usage.prompt_tokens, r.usage.completion_tokens)
    # Anthropic's target has no default: its calls must say (the SDK always does).
    tok2, _ = ai.token()
    raw = requests.post(f"{ai.url}/claude/v1/messages", headers={"authorization": f"Bearer {tok2}", "content-type": "application/json"},
                        data=json.dumps({"model": "claude-big", "messages": [{"role": "user", "content": "hi"}]}), timeout=10)
    assert raw.status_code == 400 and "max_tokens" in raw.json()["message"]


def test_a_stream_is_made_to_report_its_usage_and_the_sdks_stream_helper_works(ai):
    tok, jti = ai.token()
    oa = ai.openai(tok)
    chunks = list(oa.chat.completions.create(model="mini-1", max_tokens=9, messages=[{"role": "user", "content": "hi"}], stream=True))
    assert json.loads(ai.seen[-1][3])["stream_options"] == {"include_usage": True}
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens == 9
    with oa.chat.completions.stream(model="mini-1", max_tokens=9, messages=[{"role": "user", "content": "hi"}],
                                    extra_headers={"x-test-output-tokens": "7"}) as s:
        final = s.get_final_completion()
    es = ai.entries(jti, 2)
    assert [(e["usage"], e["tokens_out"]) for e in es] == [("read", "9"), ("read", "7")], es
    assert final.choices[0].message.content.startswith("Hello")


def test_an_image_costs_the_tokens_its_model_says(ai):
    tok, jti = ai.token()
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    ai.openai(tok).chat.completions.create(model="mini-1", max_tokens=5, messages=[{"role": "user", "content": [image, image]}])
    (e,) = ai.entries(jti, 1)
    body = ai.seen[-1][3]
    assert int(e["reserved"]) == math.ceil(5 * 600_000 / 1e6) + math.ceil((len(body) + OVERHEAD + 2 * 3000) * 150_000 / 1e6)


def test_a_body_that_lies_about_its_size_is_refused(ai):
    tok, _ = ai.token()
    body = json.dumps({"model": "mini-1", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).encode()
    h = {"authorization": f"Bearer {tok}", "content-type": "application/json"}
    # Declared larger than the target reads: refused at the headers, before the body.
    r = raw_request(ai.ports["hardened"], ["POST /oai/v1/chat/completions HTTP/1.1", "Host: x", f"authorization: Bearer {tok}",
                                           "content-type: application/json", "content-length: 99999999", "Connection: close"])
    assert r.split(" ", 2)[1] == "413", r
    # A chunked body of several MiB: refused once past the bound, never forwarded.
    before = len(ai.seen)

    def gen():
        yield b'{"model":"mini-1","max_tokens":5,"messages":[{"role":"user","content":"'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}]}'
    r = requests.post(f"{ai.url}/oai/v1/chat/completions", headers=h, data=gen(), timeout=20)
    assert r.status_code == 413, r.text
    assert len(ai.seen) == before


def test_a_child_spends_within_its_parent(ai):
    parent_cap = 400_000
    c = harness.claims(["oai * /**"], sub="agent/research", ttl=600, lim={"spend": 300_000}, par="parent-ai", plim={"spend": parent_cap}, pkid="k1")
    kid1 = harness.mint(ai.gw.k1, c)
    c2 = dict(c, jti="jti-" + c["jti"][4:] + "b")
    kid2 = harness.mint(ai.gw.k1, c2)
    msgs = [{"role": "user", "content": "hi"}]
    r = ai.openai(kid1).chat.completions.create(model="big-1", max_tokens=400, messages=msgs)
    spent = price(PRICES["big-1"], r.usage.prompt_tokens, r.usage.completion_tokens)
    assert spent > parent_cap - 300_000, "the parent has less left than a second call's bound"
    with pytest.raises(openai.RateLimitError):
        ai.openai(kid2).chat.completions.create(model="big-1", max_tokens=400, messages=msgs)
    # A smaller call still fits the parent's remainder.
    ai.openai(kid2).chat.completions.create(model="big-1", max_tokens=50, messages=msgs)


def test_the_responses_api_and_its_stream_are_priced(ai):
    tok, jti = ai.token()
    oa = ai.openai(tok)
    r = oa.responses.create(model="mini-1", input="Say hello", max_output_tokens=30)
    events = list(oa.responses.create(model="mini-1", input="Say hello", max_output_tokens=30, stream=True))
    done = [e for e in events if e.type == "response.completed"][0]
    es = ai.entries(jti, 2)
    assert [int(e["cost"]) for e in es] == [price(PRICES["mini-1"], r.usage.input_tokens, r.usage.output_tokens),
                                            price(PRICES["mini-1"], done.response.usage.input_tokens, done.response.usage.output_tokens)]
    assert all(e["usage"] == "read" for e in es)


@pytest.mark.parametrize("rewritten", [False, True], ids=["as-sent", "limit-written-in"])
@pytest.mark.parametrize("how", framing.WITH_BODY + framing.RESETS)
def test_every_framing_is_priced_and_settled(ai, how, rewritten):
    """HTTP/1.1 with a length, chunked, chunked with trailers; HTTP/2 with DATA and with trailers:
    each is decided at its body's end and settled from its answer, also when the gateway writes
    the target's output limit into it. A reset mid-body reaches nothing and holds nothing."""
    tok, jti = ai.token(spend=2_000)
    body = json.dumps({"model": "mini-1", "max_tokens": 7, "messages": [{"role": "user", "content": "hi"}]}).encode()
    if rewritten:
        body = json.dumps({"model": "mini-1", "messages": [{"role": "user", "content": "hi"}]}).encode()
    before = len(ai.seen)
    a = framing.send(ai.ports["hardened"], how, "POST", "/oai/v1/chat/completions",
                     {"authorization": f"Bearer {tok}", "content-type": "application/json"}, body)
    if how in framing.RESETS:
        time.sleep(0.3)
        assert len(ai.seen) == before, "a request reset mid-body never reaches the vendor"
        assert [e["decision"] for e in ai.entries(jti) if e["decision"] == "allow"] == []
        return
    assert a.status_code == 200, (a.status_code, a.body)
    (e,) = ai.entries(jti, 1)
    if rewritten:
        got = ai.seen[-1][3]
        assert json.loads(got) == dict(json.loads(body), max_completion_tokens=256), got
        assert int(ai.seen[-1][2]["content-length"]) == len(got)
        assert e["usage"] == "read" and int(e["tokens_out"]) == 256, e
        return
    assert (e["usage"], int(e["tokens_out"])) == ("read", 7), e
    assert ai.seen[-1][3] == body, "the vendor got the body intact"


def test_keyward_report_sums_tokens_and_cost_per_model(ai):
    tok, jti = ai.token()
    oa = ai.openai(tok)
    for n in (5, 9):
        oa.chat.completions.create(model="mini-1", max_tokens=n, messages=[{"role": "user", "content": "hi"}])
    es = ai.entries(jti, 2)
    out = harness.cli("report", str(ai.access_log), "--json")
    assert out.returncode == 0, out.stderr
    rows = [m for m in json.loads(out.stdout)["models"] if (m["target"], m["model"]) == ("oai", "mini-1")]
    assert len(rows) == 1 and rows[0]["tokens_out"] >= 14 and rows[0]["cost"] >= sum(int(e["cost"]) for e in es), rows
    text = harness.cli("report", str(ai.access_log))
    assert "model calls" in text.stdout and "mini-1" in text.stdout


def test_unpriced_paths_and_targets_are_not_read(ai):
    tok, jti = ai.token()
    r = requests.get(f"{ai.url}/oai/v1/models", headers={"authorization": f"Bearer {tok}"}, timeout=10)
    assert r.status_code == 200
    (e,) = ai.entries(jti, 1)
    assert e["model"] is None and e["usage"] is None and e["cost"] is None
    time.sleep(0)


def test_three_gateways_share_one_5_usd_cap_on_a_fleet_ledger(gw, workdir):
    """With a fleet ledger (dynalite), calls spread over three gateways, whole and streamed, never
    pass the cap together; once every gateway has drained, the ledger holds exactly what the
    calls' reported usage cost."""
    import aws
    import ledger
    db = ledger.Dynalite(workdir, name="dynalite-ai")
    vendor_port = harness.free_port()
    vendor = model_vendor.serve(vendor_port)
    gateways = []
    try:
        creds = aws.credentials_env()
        ddb = ledger.client(db.url, creds)
        ledger.create_table(ddb, "ai-ledger")
        cfg = ai_config()
        cfg["ledger"] = ledger.ledger_section(table="ai-ledger", lease_s=3)
        env = ledger.env_for(gw.env, creds)
        base = dict(gw.ports, vendor=vendor_port)
        gateways = [ledger.Gateway(workdir, f"envoy-ai-fleet-{i}", cfg, env, db.port, base, concurrency=1) for i in range(3)]
        c = harness.claims(["oai * /**"], sub="agent/fleet", ttl=600, lim={"spend": CAP})
        tok = harness.mint(gw.k1, c)
        clients = [openai.OpenAI(api_key=tok, base_url=f"{g.url}/oai/v1", max_retries=0, timeout=20) for g in gateways]
        prompt = [{"role": "user", "content": "Summarise the fleet ledger."}]

        def one(i):
            oa = clients[i % 3]
            try:
                if i % 2:
                    chunks = list(oa.chat.completions.create(model="big-1", max_tokens=400, messages=prompt, stream=True,
                                                             stream_options={"include_usage": True}))
                    u = chunks[-1].usage
                elif i % 4 == 0:
                    # No limit of its own: the target's is written into it, also when the call
                    # waited for the ledger first.
                    u = oa.chat.completions.create(model="big-1", messages=prompt).usage
                else:
                    u = oa.chat.completions.create(model="big-1", max_tokens=400, messages=prompt).usage
                return price(PRICES["big-1"], u.prompt_tokens, u.completion_tokens)
            except openai.RateLimitError:
                return None
            except openai.InternalServerError as e:
                return f"{e.status_code}: {e.response.text}"

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(60)))
        assert not [r for r in results if isinstance(r, str)], "a healthy ledger refuses nothing with 503"
        charged = [x for x in results if x is not None]
        assert charged and sum(charged) <= CAP, (len(charged), sum(charged))
        assert sum(charged) >= CAP // 2, f"only {sum(charged)} of {CAP} was used"
        for g in gateways:
            g.drain()
        spend, _ = ledger.held(ddb, "ai-ledger", ledger.credential_pk(gw.k1, c["jti"]))
        assert spend == sum(charged), (spend, sum(charged))
    finally:
        for g in gateways:
            g.stop()
        vendor.shutdown()
        db.close()
