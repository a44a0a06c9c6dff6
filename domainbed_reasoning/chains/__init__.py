"""What the chain builder and the trainer share: the five-stage format, the prompts, the judge.

A chain is parsed by `chain_format`, its conclusion read by `matching`, and
`verdict.judge` decides label consistency for the builder and SARR alike.
"""
