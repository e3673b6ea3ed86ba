"""5. Token endpoint: SMART Backend Services token issuance per second (client_credentials with a
private_key_jwt assertion). Every request carries a fresh assertion (the gateway refuses a replayed
jti), pre-signed before the timed loop so the client's ES384 signing is not measured. The ratio
compares it with a read through the gateway at the same concurrency: how many reads one token
issuance costs."""

from __future__ import annotations

from bench import cost, load, sides
from bench.measures.context import Context
from bench.report import Result, Row
from tests.actors import JWT_BEARER

KEY = "5-token-endpoint"
TITLE = "5 token endpoint (backend token issuance ÷ gateway read)"
SCOPE = "system/DocumentReference.rs"
READ_PATH = "/fhir/DocumentReference/demo-note-1"


async def run(ctx: Context) -> Result:
    result = Result(KEY, TITLE)
    plan = ctx.plan
    client = ctx.stack.client
    probe_n = 50  # datastore operations per token, counted one request at a time
    total = plan.token_assertions + plan.warmup + probe_n
    assertions = [client.assertion() for _ in range(total)]  # 4-minute lifetime: used right away
    token = ctx.stack.token()
    http = load.loopback_client(ctx.stack.gateway_url, concurrency=plan.concurrency)
    try:
        async def issue(n: int) -> int:
            form = {"grant_type": "client_credentials", "scope": SCOPE,
                    "client_assertion_type": JWT_BEARER, "client_assertion": assertions[n]}
            return (await http.post("/oauth/token", data=form)).status_code

        async def read(n: int) -> int:
            return (await http.get(READ_PATH, headers={"Authorization": f"Bearer {token}"})).status_code

        probe = await http.post("/oauth/token", data={
            "grant_type": "client_credentials", "scope": SCOPE,
            "client_assertion_type": JWT_BEARER, "client_assertion": client.assertion()})
        if probe.status_code != 200:
            return result.failed(f"token endpoint answered {probe.status_code}: {probe.text[:200]}")
        issued = await load.drive(issue, load.Bounds(plan.concurrency, plan.token_assertions,
                                                     plan.seconds * plan.rounds, plan.warmup))
        reads = await load.drive(read, load.Bounds(plan.concurrency, plan.max_requests,
                                                   plan.seconds * plan.rounds, plan.warmup))
        per_token = await cost.per_request(issue, datastores=ctx.stack.datastores("gateway"),
                                           pids=ctx.stack.pids(), n=probe_n,
                                           first=plan.token_assertions + plan.warmup)
    finally:
        await http.aclose()
    result.parameters = {"scope": SCOPE, "assertion_alg": "ES384", **plan.as_dict()}
    result.figures = {"token": {**issued.summary(), "cost": per_token.to_json()},
                      "gateway_read": reads.summary()}
    ratio = issued.throughput / reads.throughput if reads.throughput else None
    result.rows = [Row(TITLE, f"tokens {sides.describe(issued)}; gateway reads {sides.describe(reads)}",
                       ratio, "— (no target)", None,
                       [f"Per token issued: {per_token.describe()}."])]
    return result
