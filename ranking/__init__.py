"""Candidate retrieval, collaborative filtering, reranking, the Recommender and the online ranker
(installed as ``apex_rank.ranking``)."""
