"""An acquirer simulator run as its own server: card pay-ins, bank payouts, status queries,
signed callbacks, deterministic fault injection and daily settlement statements.

It stands beside the region nodes: it imports nothing from them (it plays a third party),
and the nodes reach it only through `channel.client` over HTTP and verify its callbacks
with `channel.signing`.
"""
