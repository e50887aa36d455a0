"""Files of the jobs a worker holds: signed URLs and direct transfers."""
