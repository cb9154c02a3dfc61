"""The router's audit trail: a hash-chained, signed SQLite record of every decision.

    events   what the router reports per decision (`AuditEvent`) and the sink contract
    notes    lifecycle notes: start, stop, policy loads, certificate changes
    store    `AuditStore`, the durable sink, written before every reply
    writer   the one thread that owns the database connection
    file     one database file and the chain in it
    codec    canonical record bodies, the hash chain, the keys
    db       the schema and the statements everyone shares
    verify   checking the chain and the signed checkpoints; pruning
    query    filters, rows and statistics for readers
    metrics  Prometheus metrics of the trail
    cli      `hybridroute audit ...`

Nothing is re-exported here: import from the module that defines a name.
"""
