"""Serving a Together fine-tune where Together serves it: serverless, or on a dedicated
endpoint this run makes, pays for by the minute and deletes.

Together serves some fine-tunes serverless and others only on a dedicated endpoint (billed
by the minute), and its docs disagree on which. So before the first generation with a model
a job made, one 1-token request asks (:meth:`Endpoints.route`). When Together refuses, the
run stops there, before it spends more, naming the hardware Together lists for the model
with its price per minute; the fine-tune is kept (a rerun reuses it). With
``--together-endpoint HARDWARE`` (or ``auto``: the cheapest available) it instead creates a
dedicated endpoint, found again by its display name on a rerun, recorded in
``workdir/endpoints/`` the moment it exists, stopped by Together after
:data:`ENDPOINT_IDLE_MINUTES` unused minutes (so a killed run stops paying) and deleted when
the run ends (:meth:`Endpoints.close`). Its minutes are counted with each generation call
that uses it and checked against ``--max-cost-usd``.

:class:`~.together.Together` (the provider's adapter) holds one :class:`Endpoints` and
hands it its ``route`` and ``close``.
"""
from __future__ import annotations

import re
import time

import together

from .. import cost
from ..errors import BackendError, ConfigError
from ..rundir import digest
from ..types import Usage
from .api_errors import server_message

ENDPOINT_IDLE_MINUTES = 15
"""A dedicated endpoint made here stops after this many minutes unused (Together's
``inactive_timeout``): a run killed before deleting it stops paying then."""
NOT_SERVERLESS = re.compile(r"non-serverless|dedicated endpoint", re.I)
"""Together's refusal to serve a model serverless ("Unable to access non-serverless model
X. Please visit ... to create and start a new dedicated endpoint for the model.")."""


class Endpoints:
    """The dedicated endpoints of one backend (see the module docstring)."""

    def __init__(self, hardware: str | None = None):
        """``hardware``: of a dedicated endpoint for a fine-tune Together will not serve
        serverless (``auto``: the cheapest available); None stops the run there."""
        self.hardware = hardware
        self._routes: dict[str, str] = {}
        self._endpoints: dict[str, dict] = {}  # model -> its endpoint's record
        self._refused = ""

    def route(self, backend, model: str) -> tuple[str, Usage]:
        """The name to chat with ``model`` under (itself, or its dedicated endpoint's) and
        the endpoint's minutes since last asked."""
        if model not in self._routes:
            self._routes[model] = self._serving(backend, model)
        target = self._routes[model]
        return target, (self._uptime(backend, model) if target != model else Usage())

    def _serving(self, backend, model: str) -> str:
        if backend.made(model) is None:
            return model  # a base model (or the user's own endpoint): as named
        record = backend.records.read("endpoints", model)
        if record is None or record.get("deleted"):
            if self._serverless(backend, model):
                return model
            record = self._create(backend, model)
        self._endpoints[model] = record
        self._start(backend, record)
        return record["name"]

    def _serverless(self, backend, model: str) -> bool:
        """Whether Together serves ``model`` serverless: one request of one token (counted
        in the budget's total), refused or not."""
        what = f"asking Together to serve {model}"
        try:
            completion = backend.client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
        except together.APIStatusError as e:
            if e.status_code in (400, 403, 404) and NOT_SERVERLESS.search(server_message(e)):
                self._refused = backend.scrub(server_message(e))
                return False
            with backend.errors(what):
                raise
        except together.TogetherError:
            with backend.errors(what):
                raise
        if completion.usage is not None:
            root = backend.made(model)["root"]
            backend.spending.add(Usage(
                completion.usage.prompt_tokens, completion.usage.completion_tokens,
                cost_usd=cost.chat_cost(root, completion.usage.prompt_tokens,
                                        completion.usage.completion_tokens,
                                        prices=backend.prices)))
        return True

    def _create(self, backend, model: str) -> dict:
        """A dedicated endpoint for ``model`` (one already made for it is found by its
        display name), recorded the moment it exists."""
        hardware, cents = self._choose(backend, model)
        if cents is not None:
            backend.budget.check(f"a dedicated endpoint for {model} on {hardware} (at least "
                                 f"{ENDPOINT_IDLE_MINUTES} minutes)",
                                 cents / 100 * ENDPOINT_IDLE_MINUTES)
        display = f"semievol-{digest(model)[:16]}"
        with backend.errors("listing dedicated endpoints"):
            mine = backend.client.get("/v1/endpoints", cast_to=object,
                                      options={"params": {"type": "dedicated"}})
        found = [e for e in mine.get("data", []) if e.get("display_name") == display]
        if found:
            endpoint = found[0]
            backend.say(f"found dedicated endpoint {endpoint['id']} for {model}; not "
                        "creating another")
        else:
            with backend.errors(f"creating a dedicated endpoint for {model}"):
                endpoint = backend.client.post("/v1/endpoints", cast_to=object, body={
                    "model": model, "hardware": hardware, "display_name": display,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                    "inactive_timeout": ENDPOINT_IDLE_MINUTES})
            backend.say(f"created dedicated endpoint {endpoint['id']} for {model} on "
                        f"{hardware}" + (f" at {_per_minute(cents)}" if cents is not None
                                         else "") + "; deleted when the run ends")
        record = {"id": endpoint["id"], "name": endpoint["name"], "model": model,
                  "hardware": endpoint.get("hardware", hardware),
                  "usd_per_minute": None if cents is None else cents / 100,
                  "billed_until": time.time()}
        backend.records.write("endpoints", model, record)
        return record

    def _choose(self, backend, model: str) -> tuple[str, float | None]:
        """The hardware to serve ``model`` on and its cents per minute (None: not listed);
        without ``hardware`` set, the BackendError that stops the run, naming the flag and
        what Together lists."""
        options = self._listed(backend, model)
        if self.hardware is None:
            listed = "; ".join(f"{hw} {_per_minute(cents)}" for hw, cents in options[:4])
            raise BackendError(
                f"Together will not serve the fine-tune {model} serverless "
                f"({self._refused}). It is kept: a rerun reuses it and trains nothing again. "
                "Rerun with --together-endpoint HARDWARE (or auto, the cheapest) to serve it "
                "on a dedicated endpoint, billed by the minute and deleted when the run ends"
                + (f"; Together lists for it: {listed}" if listed else "") + ". Nothing more "
                "was spent.")
        prices = dict(options)
        hardware = min(prices, key=prices.get) if self.hardware == "auto" and prices \
            else self.hardware
        if hardware == "auto" or (prices and hardware not in prices):
            raise ConfigError(f"--together-endpoint {self.hardware}: Together lists "
                              + (", ".join(prices) or "no hardware") + f" for {model}")
        return hardware, prices.get(hardware)

    def _listed(self, backend, model: str) -> list[tuple[str, float]]:
        """(hardware, cents per minute) Together lists for ``model``, available ones
        first, cheapest first."""
        with backend.errors(f"listing the hardware for {model}"):
            listed = backend.client.get("/v1/hardware", cast_to=object,
                                        options={"params": {"model": model}})
        rows = [(h.get("availability") or {}).get("status", "available") != "available"
                for h in listed.get("data", [])]
        options = sorted(((busy, h["pricing"]["cents_per_minute"], h["id"])
                          for busy, h in zip(rows, listed.get("data", []))))
        return [(hw, cents) for _, cents, hw in options]

    def _start(self, backend, record: dict) -> None:
        """Wait until the endpoint serves (starting it again if it stopped, idle)."""
        path = f"/v1/endpoints/{record['id']}"

        def fetch():
            with backend.errors(f"checking dedicated endpoint {record['id']}"):
                endpoint = backend.client.get(path, cast_to=object)
            if endpoint["state"] in ("STOPPED", "STOPPING"):
                with backend.errors(f"starting dedicated endpoint {record['id']}"):
                    backend.client.patch(path, cast_to=object, body={"state": "STARTED"})
            return endpoint

        endpoint = backend.poll(fetch, lambda e: e["state"] in ("STARTED", "ERROR"))
        if endpoint["state"] != "STARTED":
            raise BackendError(f"dedicated endpoint {record['id']} is {endpoint['state']}; "
                               "run again to resume")

    def _uptime(self, backend, model: str) -> Usage:
        """The endpoint's minutes since they were last counted, at its price."""
        record = self._endpoints[model]
        now = time.time()
        usd = None if record["usd_per_minute"] is None else \
            (now - record["billed_until"]) / 60 * record["usd_per_minute"]
        record["billed_until"] = now
        backend.records.write("endpoints", model, record)
        return Usage(cost_usd=usd)

    def close(self, backend) -> None:
        """Delete the dedicated endpoints this run made; their last minutes are counted."""
        recorded = {r["model"]: r for r in backend.records.all("endpoints")}
        for model, record in {**recorded, **self._endpoints}.items():
            if record.get("deleted"):
                continue
            self._endpoints[model] = record
            used = backend.spending.add(self._uptime(backend, model))
            what = f"deleting dedicated endpoint {record['id']}"
            try:
                backend.client.delete(f"/v1/endpoints/{record['id']}", cast_to=type(None))
            except together.NotFoundError:
                pass  # deleted already
            except together.TogetherError:
                with backend.errors(what):
                    raise
            backend.records.write("endpoints", model, {**record, "deleted": True})
            self._endpoints.pop(model)
            self._routes.pop(model, None)
            backend.say(f"deleted dedicated endpoint {record['id']}"
                        + (f" (its last minutes: {cost.format_usd(used.cost_usd)})"
                           if used.cost_usd is not None else ""))


def _per_minute(cents: float) -> str:
    return f"${cents / 100:.4f}/minute (${cents * 0.6:.2f}/hour)"
