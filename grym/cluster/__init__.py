"""Local multi-front-end setups: a throwaway PostgreSQL, a balancer, several servers."""
