"""Emails to users when their jobs end, and the users' choice to receive them."""
