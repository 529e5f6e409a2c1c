"""The dashboard in a real browser (headless Debian Chromium through Selenium) against a real
``squadbus serve``: messages sent over the API and the CLI appear in the overview, the executions list, the
conversation and the sequence view; the conversation recovers from a server restart with no gap and no
duplicate; an admin re-drives a dead letter and the group gets it again; a viewer is refused, in words.

Every wait is an explicit WebDriverWait with a generous timeout; nothing asserts a duration.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest
from selenium.webdriver.common.by import By

from squadbus.core import envelope
from squadbus.core.backend import ConsumerOptions, Delivery, publish_all
from squadbus.core.bus import Bus
from squadbus.core.errors import Reject
from tests.browser.conftest import TOKENS, Loop, Page, Served

pytestmark = [pytest.mark.nats, pytest.mark.slow]


def send(served: Served, execution: uuid.UUID, content: str, **fields: Any) -> dict[str, Any]:
    body = {"sender_id": "pm", "recipient_id": "dev-1", "content": content, "task_execution_id": str(execution),
            **fields}
    with served.api("pm") as api:
        r = api.post("/v1/messages", json=body)
    assert r.status_code == 201, r.text
    sent: dict[str, Any] = r.json()
    return sent


def seqs(page: Page) -> list[int]:
    rows = page.driver.find_elements(By.CSS_SELECTOR, "#conversation .msg")
    return [int(el.get_attribute("data-seq") or 0) for el in rows]


def test_token_overview_executions_conversation_sequence_and_agents(
        page: Page, served: Served, bus: Bus, loop: Loop) -> None:
    execution = uuid.uuid4()
    page.open("/")
    # the service has tokens: the page asks for one, in words
    page.text_of("h1", "A token is needed")
    page.element("#token-input").send_keys(TOKENS["viewer"]["token"])
    page.element("form.token button").click()
    page.text_of("h1", "Overview")
    page.text_of("#overview-empty", "Nothing has been sent yet")
    page.text_of("#groups", "dead-letter-keeper")  # groups with lag and pending, read from /metrics
    page.until(lambda d: "live" in d.find_element(By.CSS_SELECTOR, "h1 .status").text, "overview stream not live")

    send(served, execution, "Plan the release: 3 tasks", message_type="plan")
    send(served, execution, "Standup in 5 minutes", recipient_id=None, domain="dev")
    send(served, execution, "Release is out", recipient_id=None, message_type="announcement")
    out = served.cli_send("pm", "dev-1", "Sent from the CLI", "--execution", str(execution), "--type", "task")
    assert "agent.message.dev-1" in out

    # the overview updates live, without a reload
    page.element(f'#active a[href="#/executions/{execution}"]')
    page.element('[data-agent="pm"]')
    page.text_of("#rate-chart .legend", "plan")
    page.text_of("#rate-chart .legend", "task")
    assert page.driver.find_elements(By.CSS_SELECTOR, "#rate-chart svg rect")
    page.until(lambda d: not d.find_element(By.ID, "overview-empty").text, "empty state still shown")
    page.screenshot("overview")

    page.element('header nav a[data-view="executions"]').click()
    row = page.element(f'#executions tr[data-execution="{execution}"]')
    page.until(lambda d: row.find_elements(By.CSS_SELECTOR, "td")[2].text == "4", "executions list count")
    page.until(lambda d: d.find_element(By.CSS_SELECTOR, "h1 .status").text == "live", "executions stream not live")
    # a new execution (sent by other agents, straight on the bus) comes in at the top without a reload
    newer = uuid.uuid4()
    loop.run(bus.publish(envelope.build(subject="agent.message.qa-2", sender_id="qa-1", recipient_id="qa-2",
                                        content="a new task", task_execution_id=newer)))
    first_row = "#executions tbody tr"
    page.until(lambda d: d.find_element(By.CSS_SELECTOR, first_row).get_attribute("data-execution") == str(newer),
               "the new execution did not appear at the top of the open list")
    older = page.element(f'#executions tr[data-execution="{execution}"]')
    assert older.find_elements(By.CSS_SELECTOR, "td")[2].text == "4", "listed once, below it"
    assert len(page.driver.find_elements(By.CSS_SELECTOR, f'#executions tr[data-execution="{execution}"]')) == 1
    page.screenshot("executions")
    # a burst (more than the list reads one by one) comes in too
    burst = {uuid.uuid4() for _ in range(25)}
    loop.run(publish_all(bus.backend, [envelope.build(subject="agent.message.qa-2", sender_id="qa-1",
                                                      recipient_id="qa-2", content="burst", task_execution_id=e)
                                       for e in burst]))
    top = lambda d: {r.get_attribute("data-execution") for r in d.find_elements(By.CSS_SELECTOR, first_row)[:25]}  # noqa: E731
    page.until(lambda d: top(d) == {str(e) for e in burst}, "the burst is not at the top of the list")
    # searchable by type and time; the search is in the URL
    page.open("/executions?type=task&period=1h")
    page.element(f'#executions tr[data-execution="{execution}"]')
    page.open("/executions?type=no-such-type")
    page.text_of("main p", "No execution matches this search.")
    page.open("/executions")
    row = page.element(f'#executions tr[data-execution="{execution}"]')

    row.find_element(By.CSS_SELECTOR, "a").click()
    page.text_of("#conversation .msg", "Sent from the CLI")
    page.until(lambda d: seqs(page) == [1, 2, 3, 4], "conversation rows")
    routes = page.texts("#conversation .msg .route")
    assert routes == ["pm → dev-1", "pm → #dev", "pm → *", "pm → dev-1"]
    page.text_of("#summary", "4 messages · 2 agents: dev-1, pm")
    page.screenshot("conversation")

    page.element("#show-sequence").click()
    page.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sequence svg .arrow")) == 4, "sequence arrows")
    lanes = page.texts("#sequence .lane-label")
    assert lanes == ["pm", "dev-1", "#dev", "* (squad)"]
    assert page.driver.current_url.endswith(f"#/executions/{execution}?view=sequence")
    page.driver.refresh()  # the URL holds the view: a reload (or a shared link) shows the sequence again
    page.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sequence svg .arrow")) == 4, "sequence after reload")
    assert not page.element("#sequence").get_attribute("hidden")
    page.screenshot("sequence")

    loop.run(bus.inbox("qa-3").open())  # an agent with an open inbox that has not sent anything
    page.element('header nav a[data-view="agents"]').click()
    page.element('section.domain[data-domain="dev"] tr[data-agent="pm"]')
    dev = page.element('tr[data-agent="dev-1"]')
    assert dev.find_elements(By.CSS_SELECTOR, "td")[4].text == "2"  # received: the two direct messages
    quiet = page.element('tr[data-agent="qa-3"][data-inbox="open"]')
    assert [td.text for td in quiet.find_elements(By.CSS_SELECTOR, "td")[1:3]] == ["inbox open", "no message yet"]
    page.screenshot("agents")
    page.element('tr[data-agent="pm"] a').click()
    page.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#agent-messages .msg")) == 4, "agent's messages")

    # dark mode follows the system setting (prefers-color-scheme)
    page.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    page.element('header nav a[data-view="overview"]').click()
    page.element('[data-agent="pm"]')
    page.text_of("#rate-chart .legend", "plan")
    background = page.driver.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(21, 24, 29)"
    page.screenshot("overview-dark")


def test_conversation_recovers_after_a_restart_with_no_gap_and_no_duplicate(
        page: Page, served: Served, bus: Bus, loop: Loop) -> None:
    execution = uuid.uuid4()
    for n in range(3):
        send(served, execution, f"before {n}")
    page.open(f"/executions/{execution}")
    page.use_token("viewer")
    page.until(lambda d: seqs(page) == [1, 2, 3], "first three")
    status = "h1 .status"
    page.until(lambda d: d.find_element(By.CSS_SELECTOR, status).text == "live", "live")

    served.stop()
    page.until(lambda d: d.find_element(By.CSS_SELECTOR, status).text in ("reconnecting…", "connecting…"),
               "the page did not notice the server going away")
    # sent on the bus while the service is down: its db-writer stores it once it is back
    down = envelope.build(subject="agent.message.dev-1", sender_id="pm", recipient_id="dev-1",
                          content="sent while the service was down", task_execution_id=execution)
    loop.run(bus.publish(down))
    served.start()
    send(served, execution, "after the restart")
    page.until(lambda d: len(seqs(page)) >= 5, "messages after the restart")
    page.text_of("#conversation .msg", "sent while the service was down")
    page.until(lambda d: d.find_element(By.CSS_SELECTOR, status).text == "live", "live again")
    assert seqs(page) == [1, 2, 3, 4, 5]
    assert page.texts("#conversation .msg .content") == [
        "before 0", "before 1", "before 2", "sent while the service was down", "after the restart"]
    page.text_of("#summary", "5 messages")


class FlakyBilling:
    """Consumer group ``billing-<n>`` of the test process: rejects "bad" messages until healed."""

    def __init__(self) -> None:
        self.healed = threading.Event()
        self.seen: list[Any] = []

    async def handle(self, delivery: Delivery) -> None:
        if delivery.message.content.startswith("bad") and not self.healed.is_set():
            raise Reject("cannot bill this customer")
        self.seen.append(delivery.message)


def test_a_viewer_cannot_redrive_an_admin_can_and_the_group_gets_it_again(
        page: Page, served: Served, bus: Bus, loop: Loop) -> None:
    group = f"billing-{uuid.uuid4().hex[:6]}"
    flaky = FlakyBilling()
    loop.run(bus.subscribe("agent.message.>", flaky.handle, group=group,
                           options=ConsumerOptions(max_deliver=2, backoff_base=0.05)))
    execution = uuid.uuid4()
    page.open(f"/dead-letters?group={group}")
    page.use_token("viewer")
    page.text_of(".empty", "No dead letter matches this filter.")
    sent = send(served, execution, "bad invoice #42")
    row = page.element("#dead-letters tbody tr")  # comes in while the page is open
    assert page.element("#redrive-group").is_displayed()
    cells = [td.text for td in row.find_elements(By.CSS_SELECTOR, "td")]
    assert cells[1] == group and cells[2] == "rejected: cannot bill this customer"
    assert cells[3] == "1" and cells[4] == "agent.message.dev-1" and "bad invoice #42" in cells[5]
    page.screenshot("dead-letters")

    row.find_element(By.CSS_SELECTOR, "button.redrive").click()
    refused = page.text_of("#dl-notice .error", "HTTP 403")
    assert "admin only" in refused.text and "{" not in refused.text
    page.screenshot("dead-letters-viewer-refused")
    assert page.driver.find_elements(By.CSS_SELECTOR, "#dead-letters tbody tr")  # still there

    page.use_token("admin")
    flaky.healed.set()
    page.element("#dead-letters tbody tr button.redrive").click()
    done = page.text_of("#dl-notice .ok-box", "Re-driven to agent.message.dev-1")
    page.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#dead-letters tbody tr"), "row still listed")
    # (the group reads the module's whole stream: earlier tests' messages are its too)
    mine = lambda: [m for m in flaky.seen if m.task_execution_id == execution]  # noqa: E731
    page.until(lambda d: mine(), "the group did not get the re-driven message")
    [again] = mine()
    assert again.content == "bad invoice #42" and str(again.id) in done.text
    assert again.headers["redriven-from"] == sent["id"] and again.headers["redriven-by"] == "ops"
    audit = [json.loads(line) for line in served.audit.read_text().splitlines()]
    assert [(a["action"], a["by"], a["redriven_as"]) for a in audit if "action" in a] == [
        ("dead-letter-redrive", "ops", str(again.id))]
    # the conversation shows the re-driven message beside the original
    page.open(f"/executions/{execution}")
    page.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#conversation .msg")) == 2, "both in the conversation")
    page.text_of("#conversation .msg .note", "re-driven")


def test_errors_are_sentences(page: Page) -> None:
    # an agent token may not follow the whole squad nor read /metrics: each card says so, in words
    page.open("/")
    page.use_token("pm")
    chart = page.text_of("#rate-chart .error", "HTTP 403")
    assert "agent tokens cannot follow the whole squad" in chart.text
    groups = page.text_of("#groups .error", "HTTP 403")
    assert "agent tokens cannot read metrics" in groups.text
    page.screenshot("overview-agent-token")
    page.open("/executions/not-a-uuid")
    page.text_of(".error", '"not-a-uuid" is not an execution id')
    page.open("/no-such-page")
    page.text_of(".error", 'There is no page "#/no-such-page"')
    page.open("/dead-letters")
    page.text_of(".error", "HTTP 403")
    for text in page.texts(".error"):
        assert "{" not in text and "detail" not in text
