import pytest

from deployments.router import DomainRule, Message, QueryRouter

WINE = {
    "wine": DomainRule(("wine", "red", "white", "pinot", "riesling", "cellar"), ("club", "merchandise", "visiting")),
    "club": DomainRule(("membership", "member", "shipment")),
    "merchandise": DomainRule(("shop", "corkscrew", "decanter", "return", "refund")),
    "visiting": DomainRule(("hours", "tasting", "parking", "visit")),
}


@pytest.fixture
def router():
    return QueryRouter(domains=WINE)


def user(text):
    return Message("user", text)


@pytest.mark.parametrize("text", ["hi", "Hello!", "thanks a lot", "good morning", "bye", "how are you?"])
def test_small_talk_skips_retrieval(router, text):
    r = router.run(messages=[user(text)])
    assert r.kind == "small_talk" and r.query == ""


@pytest.mark.parametrize("text", ["hi, what are the opening hours?", "thanks, and do you ship corkscrews?"])
def test_a_question_after_a_greeting_is_not_small_talk(router, text):
    assert router.run(messages=[user(text)]).kind == "rag"


def test_domain_widens_to_related(router):
    r = router.run(messages=[user("which red wines do you have?")])
    assert r.domains == ("wine", "club", "merchandise", "visiting")


def test_domain_without_related(router):
    assert router.run(messages=[user("when is the tasting room open?")]).domains == ("visiting",)


def test_no_domain_words_no_filter(router):
    assert router.run(messages=[user("what is the meaning of life?")]).domains is None


def test_exact_tokens_pick_lexical(router):
    assert router.run(messages=[user('what does "ERR42" mean?')]).strategy == "lexical"
    assert router.run(messages=[user("what does retriever.top_k do?")]).strategy == "lexical"
    assert router.run(messages=[user("how do I add replicas?")]).strategy == "hybrid"


def test_follow_up_borrows_terms_from_earlier_turns(router):
    msgs = [user("Do you sell decanters in the shop?"), Message("assistant", "Yes [1]."), user("how much does it cost?")]
    r = router.run(messages=msgs)
    assert r.query.startswith("how much does it cost?")
    assert "decanters" in r.query and "shop" in r.query
    assert r.domains == ("merchandise",)


def test_standalone_question_is_left_alone(router):
    msgs = [user("Do you sell decanters?"), Message("assistant", "Yes."), user("When is the tasting room open on Sundays?")]
    assert router.run(messages=msgs).query == "When is the tasting room open on Sundays?"


def test_needs_a_user_message(router):
    with pytest.raises(ValueError, match="at least one user message"):
        router.run(messages=[Message("system", "be nice")])


def test_related_must_name_domains():
    with pytest.raises(ValueError, match=r"related \['cellar'\] are not domains"):
        QueryRouter(domains={"wine": DomainRule(("wine",), ("cellar",))})


def test_config_domain_map_is_checked(app_config):
    from common.config import AppConfig

    data = app_config.model_dump()
    data["router"] = {"domains": {"wine": {"keywords": ["wine"], "related": ["club"]}}}
    with pytest.raises(ValueError, match="not domains"):
        AppConfig.model_validate(data)
    data["router"]["domains"]["club"] = {"keywords": ["member"]}
    r = QueryRouter.from_config(AppConfig.model_validate(data))
    assert r.run(messages=[user("any wine tips?")]).domains == ("wine", "club")


# ---------------------------------------------------------------- long and hostile messages (issue 16, rows 3 and 9)

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

from deployments.router import SMALL_TALK_MAX_CHARS, cap_query, is_small_talk  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text", ["hi there!", "hiya", "okay.", "thanks so much!!", "good evening everyone", "hey all",
                                  "cheers , again!", "what's up?"])
def test_small_talk_variants_still_match(router, text):
    assert router.run(messages=[user(text)]).kind == "small_talk"


@pytest.mark.parametrize("text", ["hi there, x", "thanks again for the wine", "hi" + " " * 300 + "!"])
def test_not_small_talk(router, text):
    assert router.run(messages=[user(text)]).kind == "rag"


def test_small_talk_check_never_looks_at_a_long_message():
    assert is_small_talk("thanks so much!!") and not is_small_talk("hi" + "!" * SMALL_TALK_MAX_CHARS)


def test_router_patterns_are_linear_on_16000_character_messages():
    """'hi' + 15,900 spaces + 'x' took the old small-talk pattern 0.7-1.5 s (quadratic backtracking,
    on the router's event loop); 20 such messages took 13-30 s. Linear patterns take milliseconds
    for all of them. Run in a child process, which the timeout kills."""
    script = textwrap.dedent("""
        from deployments.router import _EXACT, _FOLLOW_UP, _SMALL_TALK, _WORD, Message, QueryRouter
        hostile = ["hi" + " " * 15900 + "x", "hi" + " !" * 7950 + "x", "good morning" + " ." * 7900 + "?x",
                   '"' + "a" * 15990, "AB-" * 5300, "a_" * 7990, "it " * 5300, " " * 15990 + "and x", "E1" * 7990]
        router = QueryRouter()
        for _ in range(20):
            for text in hostile:
                _SMALL_TALK.match(text)
                _EXACT.search(text)
                _FOLLOW_UP.search(text)
                _WORD.findall(text)
                router.run(messages=[Message("user", text[:100]), Message("user", text)])
        print("done")
    """)
    try:
        out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=8)
    except subprocess.TimeoutExpired:
        pytest.fail("the router's patterns took over 8 s on 180 hostile 16,000-character messages: "
                    "some pattern backtracks (quadratic or worse)")
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr[-2000:]


def test_a_long_message_is_capped_to_the_configured_query_size(router):
    words = [f"term{i}" for i in range(3000)]
    r = router.run(messages=[user(" ".join(words))])
    assert len(r.query) <= 1000 and len({w.lower() for w in r.query.split()}) <= 64
    assert r.query == " ".join(words[:64])  # cut before the 65th distinct word, never inside a word
    assert any("query capped" in why for why in r.reasons)


def test_borrowed_terms_are_capped_too(router):
    earlier = " ".join(f"word{i}" for i in range(7500))  # a 41,677-character query in the review
    msgs = [user(earlier), Message("assistant", "ok"), user("and how much is it?")]
    r = router.run(messages=msgs)
    assert r.query.startswith("and how much is it?") and len(set(r.query.lower().split())) <= 64
    assert len(r.query) <= 1000


def test_repeated_words_are_one_term_and_the_char_cap_ends_between_words():
    q = "wine " * 500  # 1 distinct term, 2,500 characters
    out = cap_query(q, max_chars=1000, max_terms=64)
    assert len(out) <= 1000 and set(out.split()) == {"wine"}
    assert cap_query("short question?", max_chars=1000, max_terms=64) == "short question?"
    assert cap_query("abcdefghij klm", max_chars=12, max_terms=64) == "abcdefghij"
    assert cap_query("abcdefghijklm", max_chars=5, max_terms=64) == "abcde"  # one long word: cut inside it


def test_query_caps_come_from_the_config(app_config):
    from common.config import AppConfig

    data = app_config.model_dump()
    data["router"] = {"max_query_chars": 30, "max_query_terms": 3}
    r = QueryRouter.from_config(AppConfig.model_validate(data))
    assert r.run(messages=[user("alpha beta gamma delta epsilon")]).query == "alpha beta gamma"
    assert len(r.run(messages=[user("x" * 20 + " " + "y" * 20)]).query) <= 30
    data["router"] = {"max_query_terms": 0}
    with pytest.raises(ValueError, match="max_query_terms"):
        AppConfig.model_validate(data)
    with pytest.raises(ValueError, match="max_query_chars must be >= 1, got 0"):
        QueryRouter(max_query_chars=0)
