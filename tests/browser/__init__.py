"""A real browser (Debian's chromium, headless) against a real dnsgate."""
