from django.db import models


class Order(models.Model):
    user_id = models.CharField(max_length=64)
    total_cents = models.IntegerField()
