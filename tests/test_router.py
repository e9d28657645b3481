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
