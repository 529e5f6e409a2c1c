import asyncio
import sys
import uuid

from squadbus import Bus, Inbox

async def reviewer(bus: Bus, inbox: Inbox) -> None:            # answers requests
    async for delivery in inbox:
        async with delivery:                                    # returns: ack; raises: retried later, attempt + 1
            await bus.reply(delivery.message, "reviewer", "approved")

async def developer(bus: Bus, inbox: Inbox) -> None:           # works through its inbox, one at a time
    async for delivery in inbox:
        async with delivery:
            message, answer = delivery.message, "on my way"
            print(f"dev-1 got {message.message_type}: {message.content}")
            if message.message_type == "task":
                verdict = await bus.request("dev-1", "reviewer", f"review: {message.content}", timeout=5)
                answer = f"done ({verdict.content})"
            await bus.send("dev-1", "pm", answer, "status", task_execution_id=message.task_execution_id)

async def main(url: str) -> None:
    run = uuid.uuid4()                                          # this run's task execution id
    async with Bus.from_url(url) as bus, bus.inbox("reviewer") as rev, bus.inbox("dev-1", domains=["dev"]) as dev:
        workers = [asyncio.create_task(reviewer(bus, rev)), asyncio.create_task(developer(bus, dev))]
        await bus.broadcast("pm", "stand-up in 5 minutes", domain="dev", task_execution_id=run)  # every dev agent
        await bus.send("pm", "dev-1", "build the login form", "task", task_execution_id=run)  # one agent
        answers = 0
        async with asyncio.timeout(10), bus.inbox("pm") as pm:
            async for delivery in pm:                           # both answers, whichever comes first
                async with delivery:
                    if delivery.message.task_execution_id == run:     # not a status an earlier run left
                        print(f"pm got: {delivery.message.content}")
                        if (answers := answers + 1) == 2:
                            break
        for worker in workers:
            worker.cancel()

asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "memory://"))   # or redis://, nats://, kafka://
