"""The abuse suite (docs/security.md, "The abuse suite"): the hardening issue's attacks, one
after another, against one real server while good traffic flows, with what each cost."""
