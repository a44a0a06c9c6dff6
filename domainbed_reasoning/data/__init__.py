"""Stage 1 of the data flow: DomainBed's datasets, fetched into DomainBed's folder layout and scanned.

`registry` says what each dataset is; `recipes` where DomainBed fetches it from;
`fetch`, `archive`, `prepare` and `hub_copy` get the bytes; `download` runs them;
`scan` turns a folder into the manifest every later stage starts from.
"""
