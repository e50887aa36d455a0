"""The user's files: listing, transfers, folders, renames and deletions."""
