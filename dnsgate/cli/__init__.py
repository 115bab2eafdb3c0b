"""The command line: `main` (`dnsgate serve`, `consent`, `explain`, `store migrate`, `log`,
`report`), the admin API client those commands use, and `log_and_report`.

The top layer: may import anything, imported by nothing but `dnsgate.__main__`.
"""
