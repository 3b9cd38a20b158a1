"""What users start: the offline Engine, and the assembly of one TP rank that every entry point shares."""
