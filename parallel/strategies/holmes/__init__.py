"""Holmes (ICPP 2024) on clusters with mixed NIC classes: each rank's NIC class and node
(`network`), logical ranks placed so data-parallel groups stay inside one class (`placement`),
each group's transport by class (`transport`), and pipeline stages sized by measured speed
(`partition`)."""
