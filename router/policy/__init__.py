"""Routing policy: the YAML schema, the decision engine and its detectors, and tooling.

    schema      the YAML schema, `compile_policy` and the compiled `Policy`
    checks      load-time checks, THE GUARD among them
    conditions  compiled `match:` conditions
    engine      request facts in, routing decision (with its trace) out
    detectors   PII detectors run over request text
    patterns    the safety check for custom detector patterns
    sessions    session pinning: sensitive once, on-prem afterwards
    store       the live policy, reloaded on SIGHUP or file change
    signing     detached Ed25519 signatures for policies
    cases       policy test cases written in YAML
    testing     running cases offline (`policy test`, `explain`, `diff`)
    lint        `policy check`: every error and warning in one pass
    render      how the policy commands show a decision
    diff        `policy diff`
    replay      `policy replay` of recorded traffic under a new policy
    cli         `hybridroute policy ...` parsers
    sign_cli    handlers of `policy keygen | sign | verify`

Nothing is re-exported here: import from the module that defines a name.
"""
