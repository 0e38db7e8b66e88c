"""Check suites as data (*.json); see README.md here and ckptcheck/suite.py."""
